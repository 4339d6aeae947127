//! The TCP ring as learner ranks use it: every rank a thread of this test
//! process with its own listener on 127.0.0.1:0, talking real TCP.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use encore_learner::collective::{Collective, CollectiveError, RingSecret, TcpRing};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Generous: a passing test never waits for it, and the failure tests
/// check that they fail well before it.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The ring secret the ranks of these tests share.
fn secret() -> RingSecret {
    RingSecret::new(b"collective test secret")
}

/// Binds one listener per rank and returns them with the peer addresses.
fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").to_string())
        .collect();
    (listeners, peers)
}

/// Forms a ring of `n` ranks, each connecting from its own thread.
fn ring(n: usize) -> Vec<TcpRing> {
    let (listeners, peers) = listeners(n);
    let connects = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let peers = &peers;
            move || TcpRing::connect(rank, peers, listener, "test-job/1", &secret(), TIMEOUT)
        })
        .collect();
    on_threads(connects)
        .into_iter()
        .map(|r| r.expect("ring forms"))
        .collect()
}

/// Runs one closure per rank, each on its own thread, and returns their
/// results in rank order.
fn on_threads<T: Send>(work: Vec<impl FnOnce() -> T + Send>) -> Vec<T> {
    thread::scope(|s| {
        let handles: Vec<_> = work.into_iter().map(|w| s.spawn(w)).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// Runs `op` on every rank of `rings` concurrently.
fn each<T: Send>(rings: &mut [TcpRing], op: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
    let op = &op;
    on_threads(rings.iter_mut().map(|r| move || op(r)).collect())
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}

/// Sums of random buffers of awkward lengths agree with a local sum and are
/// bit-identical on every rank, for 1 to 4 ranks, several operations on the
/// same ring.
#[test]
fn all_reduce_matches_a_local_sum_and_is_bit_identical() {
    let mut rng = StdRng::seed_from_u64(7);
    for world in 1..=4 {
        let mut rings = ring(world);
        for len in [0, 1, world.saturating_sub(1), 1_000_003] {
            let inputs: Vec<Vec<f32>> = (0..world)
                .map(|_| (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect())
                .collect();
            let outputs = {
                let work = rings
                    .iter_mut()
                    .zip(inputs.clone())
                    .map(|(ring, mut buf)| move || ring.all_reduce_sum(&mut buf).map(|()| buf))
                    .collect();
                on_threads(work)
            };
            let outputs: Vec<Vec<f32>> = outputs
                .into_iter()
                .map(|r| r.expect("all-reduce"))
                .collect();
            for (rank, out) in outputs.iter().enumerate() {
                assert_eq!(
                    bits(out),
                    bits(&outputs[0]),
                    "world {world} len {len}: rank {rank} differs from rank 0"
                );
            }
            // The error of a reordered f32 sum scales with sum |x_i|, not with
            // |sum x_i| (which may be near zero for signed inputs), so that is
            // the scale the 1e-6 relative tolerance applies to.
            for i in 0..len {
                let local: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
                let scale: f64 = inputs.iter().map(|x| f64::from(x[i]).abs()).sum();
                let got = f64::from(outputs[0][i]);
                assert!(
                    (got - local).abs() <= 1e-6 * scale.max(f64::MIN_POSITIVE),
                    "world {world} len {len} element {i}: ring {got} vs local {local}"
                );
            }
            if world == 1 {
                assert_eq!(bits(&outputs[0]), bits(&inputs[0]), "one rank: a no-op");
            }
        }
    }
}

/// A 64 MB buffer, far beyond what socket buffers hold, streams through a
/// ring of 3 without deadlock; small integers make the sum exact.
#[test]
fn a_64_mb_buffer_over_three_ranks_completes() {
    let len = 64 << 20 >> 2;
    let mut rings = ring(3);
    let results = each(&mut rings, |ring| {
        let scale = (ring.rank() + 1) as f32;
        let mut buf: Vec<f32> = (0..len).map(|i| scale * (i % 1000) as f32).collect();
        ring.all_reduce_sum(&mut buf)?;
        // 1 + 2 + 3 = 6 times the pattern; count mismatches rather than
        // keep 3 copies of the expected buffer.
        Ok::<_, CollectiveError>(
            buf.iter()
                .enumerate()
                .filter(|&(i, &x)| x != 6.0 * (i % 1000) as f32)
                .count(),
        )
    });
    for (rank, result) in results.into_iter().enumerate() {
        assert_eq!(result.expect("all-reduce"), 0, "rank {rank} has wrong sums");
    }
}

#[test]
fn broadcast_replaces_every_buffer_with_the_roots() {
    let mut rings = ring(3);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    for (root, message) in [(0, b"step=42".to_vec()), (1, Vec::new()), (2, big.clone())] {
        let results = each(&mut rings, |ring| {
            let mut buf = if ring.rank() == root {
                message.clone()
            } else {
                // Other ranks start with something else, of another length.
                vec![0xEE; 5 + ring.rank()]
            };
            ring.broadcast(&mut buf, root).map(|()| buf)
        });
        for (rank, result) in results.into_iter().enumerate() {
            let got = result.expect("broadcast");
            assert!(
                got == message,
                "root {root}: rank {rank} got {} bytes",
                got.len()
            );
        }
    }
    let err = rings[0]
        .broadcast(&mut Vec::new(), 3)
        .expect_err("root out of range");
    assert!(err.to_string().contains("root 3"), "{err}");
}

#[test]
fn barrier_waits_for_every_rank() {
    let world = 4;
    let mut rings = ring(world);
    let arrived = AtomicUsize::new(0);
    for _ in 0..3 {
        arrived.store(0, Ordering::SeqCst);
        let seen = each(&mut rings, |ring| {
            if ring.rank() == world - 1 {
                // A latecomer: without the barrier the others would see fewer
                // than `world` arrivals.
                thread::sleep(Duration::from_millis(50));
            }
            arrived.fetch_add(1, Ordering::SeqCst);
            ring.barrier()?;
            Ok::<_, CollectiveError>(arrived.load(Ordering::SeqCst))
        });
        for (rank, seen) in seen.into_iter().enumerate() {
            assert_eq!(seen.expect("barrier"), world, "rank {rank} left early");
        }
    }
}

/// Ranks configured with different world sizes refuse each other at the
/// handshake, at once, with an error that names both sizes.
#[test]
fn a_world_size_mismatch_is_refused_at_the_handshake() {
    let (mut listeners, peers) = listeners(2);
    // Rank 1 believes in a third rank, whose address nobody listens on.
    let nobody = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut peers_of_3 = peers.clone();
    peers_of_3.push(nobody.local_addr().expect("addr").to_string());
    drop(nobody);
    let l1 = listeners.pop().expect("listener 1");
    let l0 = listeners.pop().expect("listener 0");
    let started = Instant::now();
    let results = on_threads(vec![
        Box::new(|| TcpRing::connect(0, &peers, l0, "job", &secret(), TIMEOUT))
            as Box<dyn FnOnce() -> Result<TcpRing, CollectiveError> + Send>,
        Box::new(|| TcpRing::connect(1, &peers_of_3, l1, "job", &secret(), TIMEOUT)),
    ]);
    assert!(
        started.elapsed() < TIMEOUT / 3,
        "refused at once, not by timeout"
    );
    for (rank, result) in results.into_iter().enumerate() {
        let err = result.expect_err("mismatch refused");
        let text = err.to_string();
        assert!(
            matches!(err, CollectiveError::Handshake { .. }),
            "rank {rank}: {text}"
        );
        assert!(text.contains("world size mismatch"), "rank {rank}: {text}");
        assert!(
            text.contains("world_size 2") && text.contains("world_size 3"),
            "rank {rank}: {text}"
        );
    }
}

/// Two ranks that must not form a ring, rank r with `tags[r]` and
/// `secrets[r]`: both keep refusing each other until the deadline, and then
/// fail saying `why`.
fn refused_until_the_deadline(tags: [&str; 2], secrets: [RingSecret; 2], why: &str) {
    let (mut listeners, peers) = listeners(2);
    let l1 = listeners.pop().expect("listener 1");
    let l0 = listeners.pop().expect("listener 0");
    let timeout = Duration::from_millis(800);
    let (peers, secrets) = (&peers, &secrets);
    let results = on_threads(vec![
        Box::new(move || TcpRing::connect(0, peers, l0, tags[0], &secrets[0], timeout))
            as Box<dyn FnOnce() -> Result<TcpRing, CollectiveError> + Send>,
        Box::new(move || TcpRing::connect(1, peers, l1, tags[1], &secrets[1], timeout)),
    ]);
    for (rank, result) in results.into_iter().enumerate() {
        let err = result.expect_err("no ring");
        let text = err.to_string();
        assert!(
            matches!(err, CollectiveError::RendezvousTimeout { .. }),
            "rank {rank}: {text}"
        );
        assert!(text.contains(why), "rank {rank}: {text}");
    }
}

/// A peer of another ring (another tag) is refused, and the rank keeps
/// waiting for its own peer until the deadline, saying why.
#[test]
fn a_peer_of_another_ring_is_refused_until_the_deadline() {
    refused_until_the_deadline(
        ["job/gen-1", "job/gen-2"],
        [secret(), secret()],
        "ring tag mismatch",
    );
}

/// Ranks with different ring secrets refuse each other (neither can prove
/// it holds the other's secret) until the deadline, saying why; without
/// the secret check they would form a ring.
#[test]
fn a_peer_without_the_ring_secret_is_refused_until_the_deadline() {
    refused_until_the_deadline(
        ["job", "job"],
        [secret(), RingSecret::new(b"another secret")],
        "does not know the ring secret",
    );
}

/// A stranger on the listener (a health check, a scanner) does not stop the
/// ring from forming.
#[test]
fn a_stranger_on_the_listener_is_ignored() {
    let (listeners, peers) = listeners(2);
    let mut stranger = TcpStream::connect(&peers[0]).expect("connect");
    stranger
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let connects = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let peers = &peers;
            move || TcpRing::connect(rank, peers, listener, "job", &secret(), TIMEOUT)
        })
        .collect();
    let mut rings: Vec<TcpRing> = on_threads(connects)
        .into_iter()
        .map(|r| r.expect("ring forms despite the stranger"))
        .collect();
    let sums = each(&mut rings, |ring| {
        let mut buf = vec![ring.rank() as f32 + 1.0; 3];
        ring.all_reduce_sum(&mut buf).map(|()| buf)
    });
    for sum in sums {
        assert_eq!(sum.expect("all-reduce"), vec![3.0; 3]);
    }
}

/// A rank that dies (drops its connections) while the others are in an
/// all-reduce makes every other rank fail promptly, not at the timeout, and
/// leaves their rings broken.
#[test]
fn a_peer_disconnecting_mid_reduce_fails_the_others_fast() {
    let mut rings = ring(3);
    let dead = rings.pop().expect("rank 2");
    let started = Instant::now();
    let (entered_tx, entered_rx) = mpsc::channel();
    let results = thread::scope(|s| {
        let handles: Vec<_> = rings
            .iter_mut()
            .map(|ring| {
                let entered = entered_tx.clone();
                s.spawn(move || {
                    let mut buf = vec![1.0f32; 1 << 20];
                    let _ = entered.send(());
                    ring.all_reduce_sum(&mut buf)
                })
            })
            .collect();
        // Rank 2 dies once both survivors are on their way into the reduce.
        for _ in 0..2 {
            entered_rx.recv().expect("rank entered");
        }
        drop(dead);
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect::<Vec<_>>()
    });
    assert!(
        started.elapsed() < TIMEOUT / 3,
        "failed fast, not by timeout"
    );
    for (rank, result) in results.into_iter().enumerate() {
        let err = result.expect_err("a peer died");
        assert!(
            matches!(err, CollectiveError::PeerClosed { .. }),
            "rank {rank}: {err}"
        );
    }
    for ring in &mut rings {
        let err = ring.barrier().expect_err("broken");
        assert!(matches!(err, CollectiveError::Broken(_)), "{err}");
    }
}

/// A live peer that never joins the operation makes the others fail after
/// the I/O timeout.
#[test]
fn a_silent_peer_times_out() {
    let mut rings = ring(2);
    let silent = rings.pop().expect("rank 1");
    let mut waiting = rings.pop().expect("rank 0");
    waiting
        .set_io_timeout(Duration::from_millis(300))
        .expect("timeout");
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let keeper = thread::spawn(move || {
        // Holds rank 1's connections open, doing nothing, until rank 0 gave up.
        let _ = done_rx.recv();
        silent.rank()
    });
    let started = Instant::now();
    let err = waiting
        .all_reduce_sum(&mut [1.0; 10])
        .expect_err("nobody answers");
    let waited = started.elapsed();
    let _ = done_tx.send(());
    keeper.join().expect("keeper");
    assert!(
        matches!(err, CollectiveError::Timeout { peer: 1, .. }),
        "{err}"
    );
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5));
}

/// Ranks whose calls diverge (different lengths) get a protocol error that
/// names both, rather than a wrong sum.
#[test]
fn diverging_calls_are_detected() {
    let mut rings = ring(2);
    let results = each(&mut rings, |ring| {
        let mut buf = vec![1.0f32; 10 * (ring.rank() + 1)];
        ring.all_reduce_sum(&mut buf)
    });
    for (rank, result) in results.into_iter().enumerate() {
        let text = result.expect_err("lengths differ").to_string();
        assert!(
            text.contains("of 10 elements") && text.contains("of 20 elements"),
            "rank {rank}: {text}"
        );
    }
}

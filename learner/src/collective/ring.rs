//! Ring all-reduce over TCP: the collective backend of CPU learner ranks.
//!
//! # Rendezvous
//!
//! Every rank listens on the address the coordinator advertises for it
//! (`LearnerAssignment.peer_addresses[rank]`). Rank `r` accepts one
//! connection from its left neighbour `r - 1` and opens one to its right
//! neighbour `r + 1` (indices modulo the world size), both at once, because
//! every rank would otherwise wait for a neighbour that is itself waiting.
//! Connecting retries with back-off until the deadline, since ranks start
//! at different times. Both ends of a connection then exchange a hello
//! (magic, protocol version, rank, world size, ring tag, a fresh random
//! nonce) and a verdict carrying a proof that the sender knows the ring's
//! shared [`RingSecret`] (a SHA-256 over the secret, both nonces and the
//! sender's rank; the secret itself never travels):
//! - a wrong proof means the peer is not one of ours (it lacks the secret,
//!   or holds another one): the connection is refused, whatever the peer's
//!   verdict says, and this rank keeps waiting for the right peer, so a
//!   stranger can neither join the ring nor make it fail;
//! - a different tag means the peer belongs to another formation of the
//!   ring (a straggler from an earlier job or generation): the connection
//!   is refused and this rank keeps waiting for the right peer;
//! - the same tag with a different world size, rank or protocol version
//!   means the ranks were configured inconsistently: both ends fail at once
//!   with [`CollectiveError::Handshake`] naming the two values.
//!
//! # All-reduce
//!
//! The buffer is cut into `N` contiguous chunks (sizes differ by at most
//! one element). Reduce-scatter: in step `s = 0..N-1` rank `r` sends chunk
//! `r - s` to its right and receives chunk `r - s - 1` from its left, adding
//! its own values to it. After `N - 1` steps rank `r` holds the complete sum
//! of chunk `r + 1`. All-gather: in step `s` rank `r` sends chunk `r + 1 - s`
//! and receives chunk `r - s`, overwriting its own. Each rank thus sends and
//! receives `2 (N - 1) / N` of the buffer, the minimum for an all-reduce.
//!
//! Sending and receiving run at the same time (a scoped sender thread per
//! step, the calling thread receives): were every rank to write its whole
//! chunk before reading, all of them would block in `write` as soon as a
//! chunk exceeds what the socket buffers hold, a deadlock. Data moves in
//! segments of [`SEGMENT_BYTES`], so memory use does not grow with the
//! buffer.
//!
//! # Why every rank ends with the same bits
//!
//! Chunk `c` is summed along the ring starting at rank `c`:
//! `((x_c + x_{c+1}) + x_{c+2}) + ... + x_{c-1}`, each addition done once,
//! on one rank, the last one on the chunk's owner `c - 1`. The all-gather
//! only copies: the owner's bytes travel around the ring unchanged
//! (`f32::to_le_bytes`/`from_le_bytes` are exact on every bit pattern,
//! NaN payloads included). So every rank ends with the owner's bits for
//! every chunk. The result is also reproducible from run to run for the
//! same inputs and world size. It is not bit-identical to a straight local
//! `x_0 + x_1 + ...`, because each chunk starts at another rank; the
//! difference is the usual reassociation error, at most about
//! `(N - 1) * f32::EPSILON * sum |x_i|` per element.
//!
//! # Framing and failures
//!
//! Values travel little-endian. Every operation opens with a header (kind,
//! sequence number, length or root) that the receiver checks, so ranks
//! whose call sequences diverge get [`CollectiveError::Protocol`] rather
//! than a silently wrong sum. Any failure closes both connections, which
//! makes the neighbours fail at once instead of after a timeout (and their
//! neighbours in turn), and marks the ring broken. Reads and writes time out after the I/O timeout
//! without progress ([`TcpRing::set_io_timeout`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use encore_proto::v1::CollectiveBackend;
use sha2::{Digest, Sha256};

use super::{Collective, CollectiveError};

/// Bytes per read/write call and per encode/decode pass: large enough that
/// system-call overhead vanishes, small enough to stay in a core's L2.
pub const SEGMENT_BYTES: usize = 1 << 20;

/// First bytes of a hello, so a stray client (a health check, a port
/// scanner) is told apart from a peer.
const MAGIC: [u8; 4] = *b"ENCR";
/// Version of the wire format below; peers must speak the same one.
/// Version 2 added the nonce and the secret proof.
const PROTOCOL_VERSION: u16 = 2;
/// Bytes of a handshake nonce.
const NONCE_BYTES: usize = 16;
/// Bytes of a secret proof (a SHA-256).
const PROOF_BYTES: usize = 32;
/// Longest ring tag accepted, which bounds what a peer can make us read.
pub const MAX_TAG_BYTES: usize = 1024;
/// Longest rejection reason accepted in a handshake verdict.
const MAX_REASON_BYTES: usize = 4096;
/// Largest broadcast message accepted, a guard against a corrupt length.
pub const MAX_BROADCAST_BYTES: u64 = 1 << 34;
/// How long one handshake may take, so a client that connects and says
/// nothing cannot hold the listener until the deadline.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a non-blocking accept looks for a new connection.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// Back-off between connection attempts, doubling up to the maximum.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// One rank's handle on a TCP ring; see the module documentation.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    /// `None` for a world of one, which needs no connections, and once the
    /// ring is broken (the connections are closed then).
    links: Option<Links>,
    /// Counts operations; carried in every header so that diverging call
    /// sequences are detected.
    seq: u64,
    /// Why the ring broke, once it has.
    broken: Option<String>,
    /// Encoding buffers, kept between operations: one for the sender
    /// thread, one for the receiving side.
    send_staging: Vec<u8>,
    recv_staging: Vec<u8>,
}

/// The two connections of a rank in a ring of two or more.
#[derive(Debug)]
struct Links {
    /// Accepted from the left neighbour; this rank only reads from it.
    left: TcpStream,
    /// Opened to the right neighbour; this rank only writes to it.
    right: TcpStream,
    left_rank: usize,
    right_rank: usize,
    /// The I/O timeout both sockets are set to, for error messages.
    timeout: Duration,
}

impl Links {
    /// Sets both sockets up for operations with I/O timeout `timeout`.
    fn configure(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        for (stream, peer) in [(&self.left, self.left_rank), (&self.right, self.right_rank)] {
            configure(stream, timeout).map_err(|source| CollectiveError::Io {
                peer,
                op: "configuring the connection",
                source,
            })?;
        }
        self.timeout = timeout;
        Ok(())
    }

    /// Writes all of `bytes` to the right neighbour.
    fn write(&self, bytes: &[u8], op: &'static str) -> Result<(), CollectiveError> {
        (&self.right)
            .write_all(bytes)
            .map_err(|e| io_error(e, self.right_rank, op, self.timeout))
    }

    /// Fills `buf` from the left neighbour.
    fn read(&self, buf: &mut [u8], op: &'static str) -> Result<(), CollectiveError> {
        (&self.left)
            .read_exact(buf)
            .map_err(|e| io_error(e, self.left_rank, op, self.timeout))
    }

    /// Reads a header from the left neighbour and checks it is `expected`.
    fn expect(&self, expected: Header, op: &'static str) -> Result<(), CollectiveError> {
        let mut got = [0u8; HEADER_BYTES];
        self.read(&mut got, op)?;
        expected.check(&got, self.left_rank)
    }

    /// Shuts both connections down, so that any thread of ours blocked on
    /// them returns at once. Errors are ignored: the connection may already
    /// be gone, which is the point.
    fn shutdown(&self) {
        let _ = self.left.shutdown(Shutdown::Both);
        let _ = self.right.shutdown(Shutdown::Both);
    }
}

impl TcpRing {
    /// Forms the ring: accepts the left neighbour on `listener` and connects
    /// to the right neighbour at `peer_addresses[rank + 1]`, retrying until
    /// `timeout`; `timeout` is also the I/O timeout of later operations.
    ///
    /// `peer_addresses` holds every rank's `host:port`, indexed by rank, so
    /// its length is the world size. `listener` is this rank's own, bound
    /// by the caller (tests bind port 0 first and share the addresses).
    /// `tag` names this formation of the ring (see
    /// [`super::ring_tag`]); peers with another tag are refused, and so are
    /// peers that do not hold `secret`.
    pub fn connect(
        rank: usize,
        peer_addresses: &[String],
        listener: TcpListener,
        tag: &str,
        secret: &RingSecret,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        Self::connect_with(rank, peer_addresses, Some(listener), tag, secret, timeout)
    }

    /// [`TcpRing::connect`] where a world of one needs no listener.
    pub(crate) fn connect_with(
        rank: usize,
        peer_addresses: &[String],
        listener: Option<TcpListener>,
        tag: &str,
        secret: &RingSecret,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let world_size = peer_addresses.len();
        if world_size == 0 {
            return Err(CollectiveError::Config("peer_addresses is empty".into()));
        }
        if rank >= world_size {
            return Err(CollectiveError::Config(format!(
                "rank {rank} is out of range for world_size {world_size}"
            )));
        }
        if tag.len() > MAX_TAG_BYTES {
            return Err(CollectiveError::Config(format!(
                "ring tag has {} bytes, at most {MAX_TAG_BYTES} allowed",
                tag.len()
            )));
        }
        if timeout.is_zero() {
            return Err(CollectiveError::Config("timeout must be positive".into()));
        }
        let mut ring = Self {
            rank,
            world_size,
            links: None,
            seq: 0,
            broken: None,
            send_staging: Vec::new(),
            recv_staging: Vec::new(),
        };
        if world_size == 1 {
            return Ok(ring);
        }
        let listener = listener.ok_or_else(|| {
            CollectiveError::Config("the TCP ring needs this rank's bound listener".into())
        })?;
        let mut links = rendezvous(rank, peer_addresses, &listener, tag, secret, timeout)?;
        links.configure(timeout)?;
        tracing::debug!(rank, world_size, tag, "tcp ring formed");
        ring.links = Some(links);
        Ok(ring)
    }

    /// Sets the longest an operation waits for a peer without any progress
    /// before failing with [`CollectiveError::Timeout`]. Must be positive.
    pub fn set_io_timeout(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        if timeout.is_zero() {
            return Err(CollectiveError::Config(
                "io timeout must be positive".into(),
            ));
        }
        match &mut self.links {
            Some(links) => links.configure(timeout),
            None => Ok(()),
        }
    }

    /// Fails if the ring is broken, otherwise takes the next sequence number.
    fn begin(&mut self) -> Result<u64, CollectiveError> {
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::Broken(reason.clone()));
        }
        let seq = self.seq;
        self.seq += 1;
        Ok(seq)
    }

    /// On error, records why the ring broke and closes the connections.
    /// Closing (not only shutting down) matters: closing a socket with
    /// unread data resets the connection, so a neighbour blocked writing to
    /// us fails at once instead of after its timeout.
    fn finish<T>(&mut self, result: Result<T, CollectiveError>) -> Result<T, CollectiveError> {
        if let Err(err) = &result {
            self.broken = Some(err.to_string());
            if let Some(links) = self.links.take() {
                links.shutdown();
            }
            tracing::warn!(rank = self.rank, error = %err, "tcp ring broken");
        }
        result
    }

    fn reduce(&mut self, seq: u64, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let n = self.world_size;
        let r = self.rank;
        let mut header = Some(Header {
            op: Op::AllReduce,
            seq,
            arg: buf.len() as u64,
        });
        let mut staging = (&mut self.send_staging, &mut self.recv_staging);
        // Reduce-scatter, then all-gather; see the module documentation.
        // Chunk indices modulo n, kept non-negative by adding n first.
        let chunk = |offset: usize, step: usize| (r + offset + n - step) % n;
        for step in 0..n - 1 {
            // Send chunk r - s, receive (and add to) chunk r - s - 1.
            let (send, recv) = two_chunks(buf, n, chunk(n, step), chunk(n - 1, step));
            exchange(links, header.take(), send, recv, Mode::Add, &mut staging)?;
        }
        for step in 0..n - 1 {
            // Send chunk r + 1 - s, receive (and keep) chunk r - s.
            let (send, recv) = two_chunks(buf, n, chunk(1, step), chunk(0, step));
            exchange(links, None, send, recv, Mode::Copy, &mut staging)?;
        }
        Ok(())
    }

    fn broadcast_inner(
        &mut self,
        seq: u64,
        buf: &mut Vec<u8>,
        root: usize,
    ) -> Result<(), CollectiveError> {
        const OP: &str = "broadcast";
        let Some(links) = &self.links else {
            return Ok(());
        };
        let n = self.world_size;
        let header = Header {
            op: Op::Broadcast,
            seq,
            arg: root as u64,
        };
        // A chain root -> root+1 -> ... -> root-1: each rank forwards what
        // it reads, segment by segment, so a large message is pipelined.
        // The chain has no cycle (the last rank does not forward), so the
        // writes cannot deadlock.
        let position = (self.rank + n - root) % n;
        let forwards = position != n - 1;
        if position == 0 {
            let mut opening = header.encode().to_vec();
            opening.extend_from_slice(&(buf.len() as u64).to_le_bytes());
            links.write(&opening, OP)?;
            for segment in buf.chunks(SEGMENT_BYTES) {
                links.write(segment, OP)?;
            }
            return Ok(());
        }
        links.expect(header, OP)?;
        let mut len = [0u8; 8];
        links.read(&mut len, OP)?;
        let len = u64::from_le_bytes(len);
        if len > MAX_BROADCAST_BYTES {
            return Err(CollectiveError::Protocol {
                peer: links.left_rank,
                detail: format!(
                    "broadcast of {len} bytes exceeds the limit of {MAX_BROADCAST_BYTES}"
                ),
            });
        }
        if forwards {
            let mut opening = header.encode().to_vec();
            opening.extend_from_slice(&len.to_le_bytes());
            links.write(&opening, OP)?;
        }
        buf.clear();
        // Grow with the data rather than trusting the length up front.
        let mut remaining = len;
        while remaining > 0 {
            let take = remaining.min(SEGMENT_BYTES as u64) as usize;
            let start = buf.len();
            buf.resize(start + take, 0);
            links.read(&mut buf[start..], OP)?;
            if forwards {
                links.write(&buf[start..], OP)?;
            }
            remaining -= take as u64;
        }
        Ok(())
    }

    fn barrier_inner(&mut self, seq: u64) -> Result<(), CollectiveError> {
        const OP: &str = "barrier";
        let Some(links) = &self.links else {
            return Ok(());
        };
        let token = |lap: u64| Header {
            op: Op::Barrier,
            seq,
            arg: lap,
        };
        let receive = |lap| links.expect(token(lap), OP);
        let pass_on = |lap| links.write(&token(lap).encode(), OP);
        // Lap 1 goes round the ring from rank 0 and back: when rank 0 reads
        // it, every rank has arrived. Lap 2 releases ranks 1..N-1; it stops
        // before returning to rank 0, which already knows. Every rank reads
        // before it writes (but rank 0, which starts), so there is no cycle
        // of writers.
        if self.rank == 0 {
            pass_on(1)?;
            receive(1)?;
            pass_on(2)
        } else {
            receive(1)?;
            pass_on(1)?;
            receive(2)?;
            if self.rank != self.world_size - 1 {
                pass_on(2)?;
            }
            Ok(())
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> CollectiveBackend {
        CollectiveBackend::TcpRing
    }

    #[tracing::instrument(level = "debug", skip_all, fields(rank = self.rank, len = buf.len()))]
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let seq = self.begin()?;
        let result = self.reduce(seq, buf);
        self.finish(result)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(rank = self.rank, root = root))]
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::Config(format!(
                "broadcast root {root} is out of range for world_size {}",
                self.world_size
            )));
        }
        let seq = self.begin()?;
        let result = self.broadcast_inner(seq, buf, root);
        self.finish(result)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(rank = self.rank))]
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let seq = self.begin()?;
        let result = self.barrier_inner(seq);
        self.finish(result)
    }
}

/// Bounds of chunk `index` when `len` elements are cut into `n` chunks
/// whose sizes differ by at most one (the first `len % n` are longer).
pub(crate) fn chunk_bounds(len: usize, n: usize, index: usize) -> std::ops::Range<usize> {
    let base = len / n;
    let extra = len % n;
    let start = index * base + index.min(extra);
    let end = start + base + usize::from(index < extra);
    start..end
}

/// Chunk `send` for reading and chunk `recv` for writing, two distinct
/// chunks of `buf` split `n` ways.
fn two_chunks(buf: &mut [f32], n: usize, send: usize, recv: usize) -> (&[f32], &mut [f32]) {
    debug_assert_ne!(send, recv);
    let s = chunk_bounds(buf.len(), n, send);
    let r = chunk_bounds(buf.len(), n, recv);
    if s.start < r.start {
        let (low, high) = buf.split_at_mut(r.start);
        (&low[s], &mut high[..r.len()])
    } else {
        let (low, high) = buf.split_at_mut(s.start);
        (&high[..s.len()], &mut low[r])
    }
}

/// What the receiving side of a step does with the values it reads.
#[derive(Clone, Copy)]
enum Mode {
    /// Reduce-scatter: add them to ours.
    Add,
    /// All-gather: replace ours.
    Copy,
}

/// One ring step: sends `send` to the right while receiving into `recv`
/// from the left, concurrently. With a `header`, the step first sends it
/// and checks the left neighbour's.
fn exchange(
    links: &Links,
    header: Option<Header>,
    send: &[f32],
    recv: &mut [f32],
    mode: Mode,
    (send_staging, recv_staging): &mut (&mut Vec<u8>, &mut Vec<u8>),
) -> Result<(), CollectiveError> {
    const OP: &str = "all_reduce";
    if let Some(header) = header {
        // Written before anything else can fail and shut the connections
        // down, so that a neighbour whose header differs always sees ours
        // and reports the same mismatch. It is tiny and only waits for the
        // neighbour to drain the previous operation, so writing it before
        // reading cannot deadlock.
        links.write(&header.encode(), OP)?;
    }
    // The first failure is the one worth reporting: once a side fails it
    // shuts both connections down, and the other side then fails too, with
    // a less telling error.
    let failure = OnceLock::new();
    let fail = |err: CollectiveError| {
        let _ = failure.set(err);
        links.shutdown();
    };
    let send_part = || {
        if let Err(err) = write_floats(links, send, send_staging) {
            fail(err);
        }
    };
    let mut recv_part = || {
        let result = match header {
            Some(header) => links.expect(header, OP),
            None => Ok(()),
        };
        if let Err(err) = result.and_then(|()| read_floats(links, recv, mode, recv_staging)) {
            fail(err);
        }
    };
    if send.is_empty() {
        // Nothing to send (a chunk of a buffer shorter than the ring).
        recv_part();
    } else {
        thread::scope(|scope| {
            let sender = scope.spawn(send_part);
            recv_part();
            // A panic in the sender is a bug in this module; let it surface.
            if let Err(panic) = sender.join() {
                std::panic::resume_unwind(panic);
            }
        });
    }
    match failure.into_inner() {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Writes `values` to the right neighbour, little-endian, a segment at a
/// time.
fn write_floats(
    links: &Links,
    values: &[f32],
    staging: &mut Vec<u8>,
) -> Result<(), CollectiveError> {
    for segment in values.chunks(SEGMENT_BYTES / 4) {
        staging.resize(segment.len() * 4, 0);
        let (words, _) = staging.as_chunks_mut::<4>();
        for (word, value) in words.iter_mut().zip(segment) {
            *word = value.to_le_bytes();
        }
        links.write(staging, "all_reduce")?;
    }
    Ok(())
}

/// Reads `dst.len()` values from the left neighbour and adds them to or
/// copies them into `dst`.
fn read_floats(
    links: &Links,
    dst: &mut [f32],
    mode: Mode,
    staging: &mut Vec<u8>,
) -> Result<(), CollectiveError> {
    for segment in dst.chunks_mut(SEGMENT_BYTES / 4) {
        staging.resize(segment.len() * 4, 0);
        links.read(staging, "all_reduce")?;
        let (words, _) = staging.as_chunks::<4>();
        match mode {
            Mode::Add => {
                for (value, word) in segment.iter_mut().zip(words) {
                    *value += f32::from_le_bytes(*word);
                }
            }
            Mode::Copy => {
                for (value, word) in segment.iter_mut().zip(words) {
                    *value = f32::from_le_bytes(*word);
                }
            }
        }
    }
    Ok(())
}

/// Classifies an I/O error on the connection with `peer`.
fn io_error(err: io::Error, peer: usize, op: &'static str, timeout: Duration) -> CollectiveError {
    use io::ErrorKind::*;
    match err.kind() {
        // Socket timeouts surface as WouldBlock on Unix, TimedOut elsewhere.
        WouldBlock | TimedOut => CollectiveError::Timeout { peer, op, timeout },
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            CollectiveError::PeerClosed { peer, op }
        }
        _ => CollectiveError::Io {
            peer,
            op,
            source: err,
        },
    }
}

/// Socket settings for operations and the handshake.
fn configure(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    // Headers and barrier tokens are tiny; Nagle would hold them back.
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// Kinds of operation, as they appear in headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce = 1,
    Broadcast = 2,
    Barrier = 3,
}

impl Op {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "all_reduce",
            2 => "broadcast",
            3 => "barrier",
            _ => "an unknown operation",
        }
    }
}

const HEADER_BYTES: usize = 17;

/// Opens every operation: what it is, its sequence number, and its
/// argument (element count for all-reduce, root for broadcast, lap for a
/// barrier token), all of which both neighbours must agree on.
#[derive(Clone, Copy, Debug)]
struct Header {
    op: Op,
    seq: u64,
    arg: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0] = self.op as u8;
        out[1..9].copy_from_slice(&self.seq.to_le_bytes());
        out[9..17].copy_from_slice(&self.arg.to_le_bytes());
        out
    }

    /// Checks the header `got` from rank `peer` against this expected one.
    fn check(&self, got: &[u8], peer: usize) -> Result<(), CollectiveError> {
        let (op, rest) = got.split_first().unwrap_or((&0, &[]));
        let (seq, arg) = rest.split_at(rest.len().min(8));
        let seq = u64::from_le_bytes(seq.try_into().unwrap_or([0xff; 8]));
        let arg = u64::from_le_bytes(arg.try_into().unwrap_or([0xff; 8]));
        if *op == self.op as u8 && seq == self.seq && arg == self.arg {
            return Ok(());
        }
        let describe = |op: u8, seq: u64, arg: u64| {
            let what = match op {
                1 => format!("of {arg} elements"),
                2 => format!("from root {arg}"),
                3 => format!("lap {arg}"),
                _ => format!("(code {op})"),
            };
            format!("{} #{seq} {what}", Op::name(op))
        };
        Err(CollectiveError::Protocol {
            peer,
            detail: format!(
                "expected {} but the peer is in {}",
                describe(self.op as u8, self.seq, self.arg),
                describe(*op, seq, arg)
            ),
        })
    }
}

// ---------------------------------------------------------------------------
// Rendezvous.

/// The secret every rank of a ring shares (the learner's `ring_secret`, by
/// default derived from its worker token). A peer that cannot prove it
/// holds the same one is refused at the handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct RingSecret([u8; 32]);

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("RingSecret(..)")
    }
}

impl RingSecret {
    /// The ring secret made from `secret`'s bytes.
    pub fn new(secret: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"encore ring secret\0");
        hasher.update(secret);
        Self(hasher.finalize().into())
    }

    /// What rank `prover_rank`, whose own nonce is `prover_nonce`, sends to
    /// prove it knows the secret to the peer whose nonce is
    /// `verifier_nonce`. The verifier's fresh nonce keeps a recorded proof
    /// from being replayed.
    fn proof(
        &self,
        verifier_nonce: &[u8; NONCE_BYTES],
        prover_nonce: &[u8; NONCE_BYTES],
        prover_rank: u32,
    ) -> [u8; PROOF_BYTES] {
        let mut hasher = Sha256::new();
        hasher.update(b"encore ring proof\0");
        hasher.update(self.0);
        hasher.update(verifier_nonce);
        hasher.update(prover_nonce);
        hasher.update(prover_rank.to_le_bytes());
        hasher.finalize().into()
    }
}

/// What a rank says about itself when it meets a neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hello {
    version: u16,
    rank: u32,
    world_size: u32,
    tag: String,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.tag.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&self.world_size.to_le_bytes());
        out.extend_from_slice(&(self.tag.len() as u16).to_le_bytes());
        out.extend_from_slice(self.tag.as_bytes());
        out
    }

    /// Reads a hello; `Err(reason)` for anything that is not one.
    fn read(stream: &mut &TcpStream) -> Result<Self, String> {
        let mut fixed = [0u8; 16];
        stream
            .read_exact(&mut fixed)
            .map_err(|e| format!("reading hello: {e}"))?;
        if fixed[..4] != MAGIC {
            return Err("not an Encore collective peer (bad magic)".into());
        }
        let field = |at: usize| [fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]];
        let version = u16::from_le_bytes([fixed[4], fixed[5]]);
        let rank = u32::from_le_bytes(field(6));
        let world_size = u32::from_le_bytes(field(10));
        let tag_len = usize::from(u16::from_le_bytes([fixed[14], fixed[15]]));
        if tag_len > MAX_TAG_BYTES {
            return Err(format!("hello with a {tag_len}-byte tag"));
        }
        let mut tag = vec![0u8; tag_len];
        stream
            .read_exact(&mut tag)
            .map_err(|e| format!("reading hello: {e}"))?;
        Ok(Self {
            version,
            rank,
            world_size,
            tag: String::from_utf8_lossy(&tag).into_owned(),
        })
    }
}

/// Verdict codes of a handshake.
const VERDICT_OK: u8 = 0;
/// Not this ring (another tag): try again with someone else.
const VERDICT_RETRY: u8 = 1;
/// This ring, but configured inconsistently: give up.
const VERDICT_FATAL: u8 = 2;

/// How a handshake failed.
enum HandshakeError {
    /// Not the peer we are waiting for (another ring, garbage, a client
    /// that went silent): keep waiting for the right one.
    Retry(String),
    /// The right ring, inconsistently configured: fail the rendezvous.
    Fatal(CollectiveError),
}

/// Exchanges hellos and verdicts with the peer at the other end of
/// `stream`, which must be rank `expected` of the same ring.
fn handshake(
    stream: &TcpStream,
    mine: &Hello,
    secret: &RingSecret,
    expected: usize,
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let peer_addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "an unknown address".into());
    let io_timeout = deadline
        .saturating_duration_since(Instant::now())
        .min(HANDSHAKE_TIMEOUT)
        .max(Duration::from_millis(1));
    configure(stream, io_timeout)
        .map_err(|e| HandshakeError::Retry(format!("configuring {peer_addr}: {e}")))?;
    let mut io = stream;
    let retry =
        |what: &str, e: io::Error| HandshakeError::Retry(format!("{what} {peer_addr}: {e}"));
    // Both sides write first and read second; hellos are small enough for
    // the socket buffers, so this cannot deadlock.
    let my_nonce: [u8; NONCE_BYTES] = rand::random();
    let mut hello = mine.encode();
    hello.extend_from_slice(&my_nonce);
    io.write_all(&hello)
        .map_err(|e| retry("sending hello to", e))?;
    let theirs = Hello::read(&mut io)
        .map_err(|reason| HandshakeError::Retry(format!("{peer_addr}: {reason}")))?;
    let mut their_nonce = [0u8; NONCE_BYTES];
    io.read_exact(&mut their_nonce)
        .map_err(|e| retry("reading hello from", e))?;
    let (code, reason) = judge(mine, &theirs, expected);
    let mut verdict = vec![code];
    verdict.extend_from_slice(&secret.proof(&their_nonce, &my_nonce, mine.rank));
    verdict.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    verdict.extend_from_slice(reason.as_bytes());
    io.write_all(&verdict)
        .map_err(|e| retry("sending verdict to", e))?;
    let mut head = [0u8; 1 + PROOF_BYTES + 2];
    io.read_exact(&mut head)
        .map_err(|e| retry("reading verdict from", e))?;
    // Nothing a peer says counts before it proved it holds the secret.
    if head[1..=PROOF_BYTES] != secret.proof(&my_nonce, &their_nonce, theirs.rank) {
        return Err(HandshakeError::Retry(format!(
            "{peer_addr} (claiming rank {}) does not know the ring secret: check that every \
             learner rank has the same ring_secret (or worker token)",
            theirs.rank
        )));
    }
    let their_len = usize::from(u16::from_le_bytes([
        head[1 + PROOF_BYTES],
        head[2 + PROOF_BYTES],
    ]));
    if their_len > MAX_REASON_BYTES {
        return Err(HandshakeError::Retry(format!(
            "{peer_addr} sent a {their_len}-byte verdict"
        )));
    }
    let mut their_reason = vec![0u8; their_len];
    io.read_exact(&mut their_reason)
        .map_err(|e| retry("reading verdict from", e))?;
    let their_reason = String::from_utf8_lossy(&their_reason);
    let peer = format!("rank {} at {peer_addr}", theirs.rank);
    // Our own verdict first: it names our side's view of the mismatch.
    match (code, head[0]) {
        (VERDICT_OK, VERDICT_OK) => Ok(()),
        (VERDICT_FATAL, _) => Err(HandshakeError::Fatal(CollectiveError::Handshake {
            peer,
            reason,
        })),
        (_, VERDICT_FATAL) => Err(HandshakeError::Fatal(CollectiveError::Handshake {
            peer,
            reason: format!("the peer says: {their_reason}"),
        })),
        (VERDICT_RETRY, _) => Err(HandshakeError::Retry(format!("{peer}: {reason}"))),
        (_, VERDICT_RETRY) => Err(HandshakeError::Retry(format!(
            "{peer} refused us: {their_reason}"
        ))),
        (_, other) => Err(HandshakeError::Retry(format!(
            "{peer} sent an unknown verdict {other}"
        ))),
    }
}

/// This side's verdict on a peer's hello: a code and, unless it is OK, a
/// reason that names both values.
fn judge(mine: &Hello, theirs: &Hello, expected: usize) -> (u8, String) {
    if theirs.tag != mine.tag {
        return (
            VERDICT_RETRY,
            format!(
                "ring tag mismatch: the peer is in ring {:?}, this rank (rank {}) in ring {:?}",
                theirs.tag, mine.rank, mine.tag
            ),
        );
    }
    if theirs.version != mine.version {
        return (
            VERDICT_FATAL,
            format!(
                "protocol version mismatch: the peer speaks {}, this rank (rank {}) speaks {}",
                theirs.version, mine.rank, mine.version
            ),
        );
    }
    if theirs.world_size != mine.world_size {
        return (
            VERDICT_FATAL,
            format!(
                "world size mismatch: the peer (rank {}) has world_size {}, this rank (rank {}) has world_size {}",
                theirs.rank, theirs.world_size, mine.rank, mine.world_size
            ),
        );
    }
    if theirs.rank as usize != expected {
        return (
            VERDICT_FATAL,
            format!(
                "rank mismatch: this rank (rank {}) expected rank {expected} but the peer is rank {}",
                mine.rank, theirs.rank
            ),
        );
    }
    (VERDICT_OK, String::new())
}

/// Accepts the left neighbour and connects to the right one, concurrently;
/// if one side fails, the other gives up at once.
fn rendezvous(
    rank: usize,
    peer_addresses: &[String],
    listener: &TcpListener,
    tag: &str,
    secret: &RingSecret,
    timeout: Duration,
) -> Result<Links, CollectiveError> {
    let n = peer_addresses.len();
    let left_rank = (rank + n - 1) % n;
    let right_rank = (rank + 1) % n;
    let deadline = Instant::now() + timeout;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        rank: rank as u32,
        world_size: n as u32,
        tag: tag.to_owned(),
    };
    let abort = AtomicBool::new(false);
    let (left, right) = thread::scope(|scope| {
        let acceptor = scope.spawn(|| {
            let left = accept_left(
                listener, &hello, secret, left_rank, deadline, timeout, &abort,
            );
            if left.is_err() {
                abort.store(true, Ordering::SeqCst);
            }
            left
        });
        let right = connect_right(
            &peer_addresses[right_rank],
            &hello,
            secret,
            right_rank,
            deadline,
            timeout,
            &abort,
        );
        if right.is_err() {
            abort.store(true, Ordering::SeqCst);
        }
        let left = acceptor
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (left, right)
    });
    match (left, right) {
        (Ok(Some(left)), Ok(Some(right))) => Ok(Links {
            left,
            right,
            left_rank,
            right_rank,
            timeout,
        }),
        // A handshake refusal says more than the other side's timeout.
        (Err(e @ CollectiveError::Handshake { .. }), _)
        | (_, Err(e @ CollectiveError::Handshake { .. })) => Err(e),
        (Err(e), _) | (_, Err(e)) => Err(e),
        // `None` only comes back after the other side set `abort`, which it
        // does only with an error, handled above.
        _ => Err(CollectiveError::Broken("rendezvous aborted".into())),
    }
}

/// Waits on `listener` for the left neighbour, refusing other clients.
/// `Ok(None)` when aborted because the connecting side failed.
fn accept_left(
    listener: &TcpListener,
    hello: &Hello,
    secret: &RingSecret,
    left_rank: usize,
    deadline: Instant,
    timeout: Duration,
    abort: &AtomicBool,
) -> Result<Option<TcpStream>, CollectiveError> {
    let setup = |source| CollectiveError::Io {
        peer: left_rank,
        op: "rendezvous",
        source,
    };
    // Non-blocking, so the wait can end at the deadline or on abort.
    listener.set_nonblocking(true).map_err(setup)?;
    let mut last_problem = None;
    loop {
        if abort.load(Ordering::SeqCst) {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            let local = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(CollectiveError::RendezvousTimeout {
                waiting_for: format!("rank {left_rank} to connect to {local}"),
                timeout,
                last_problem,
            });
        }
        match listener.accept() {
            Ok((stream, _)) => {
                // Accepted sockets must block for the timeouts to apply.
                stream.set_nonblocking(false).map_err(setup)?;
                match handshake(&stream, hello, secret, left_rank, deadline) {
                    Ok(()) => return Ok(Some(stream)),
                    Err(HandshakeError::Fatal(err)) => return Err(err),
                    Err(HandshakeError::Retry(problem)) => {
                        tracing::debug!(%problem, "refused a collective connection");
                        last_problem = Some(problem);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            // A client that gave up before we accepted it; not ours to fail.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(setup(e)),
        }
    }
}

/// Connects to the right neighbour at `address`, retrying with back-off.
/// `Ok(None)` when aborted because the accepting side failed.
fn connect_right(
    address: &str,
    hello: &Hello,
    secret: &RingSecret,
    right_rank: usize,
    deadline: Instant,
    timeout: Duration,
    abort: &AtomicBool,
) -> Result<Option<TcpStream>, CollectiveError> {
    let mut backoff = CONNECT_BACKOFF_MIN;
    let mut last_problem = None;
    loop {
        if abort.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CollectiveError::RendezvousTimeout {
                waiting_for: format!("rank {right_rank} to accept at {address}"),
                timeout,
                last_problem,
            });
        }
        // Resolved on every attempt: in a cluster the peer's DNS name may
        // only appear once its pod is up.
        match address.to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    last_problem = Some(format!("{address} resolved to no address"));
                }
                for addr in addrs {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    if wait.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&addr, wait.min(HANDSHAKE_TIMEOUT)) {
                        Ok(stream) => match handshake(&stream, hello, secret, right_rank, deadline)
                        {
                            Ok(()) => return Ok(Some(stream)),
                            Err(HandshakeError::Fatal(err)) => return Err(err),
                            Err(HandshakeError::Retry(problem)) => last_problem = Some(problem),
                        },
                        Err(e) => last_problem = Some(format!("connecting to {addr}: {e}")),
                    }
                }
            }
            Err(e) => last_problem = Some(format!("resolving {address}: {e}")),
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        thread::sleep(backoff.min(wait));
        backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_buffer() {
        for len in [0, 1, 2, 3, 7, 100, 1001] {
            for n in 1..6 {
                let mut next = 0;
                for i in 0..n {
                    let b = chunk_bounds(len, n, i);
                    assert_eq!(b.start, next, "len {len} n {n} chunk {i}");
                    assert!(b.len() == len / n || b.len() == len / n + 1);
                    next = b.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn two_chunks_are_the_right_ones() {
        let mut buf: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let (send, recv) = two_chunks(&mut buf, 3, 2, 0);
        assert_eq!(send, &[7.0, 8.0, 9.0]);
        assert_eq!(recv, &mut [0.0, 1.0, 2.0, 3.0]);
        let (send, recv) = two_chunks(&mut buf, 3, 0, 1);
        assert_eq!(send, &[0.0, 1.0, 2.0, 3.0]);
        assert_eq!(recv, &mut [4.0, 5.0, 6.0]);
    }

    #[test]
    fn header_mismatch_names_both_sides() {
        let expected = Header {
            op: Op::AllReduce,
            seq: 4,
            arg: 10,
        };
        assert!(expected.check(&expected.encode(), 1).is_ok());
        let got = Header {
            op: Op::Barrier,
            seq: 4,
            arg: 1,
        };
        let err = expected.check(&got.encode(), 1).unwrap_err().to_string();
        assert!(err.contains("all_reduce #4 of 10 elements"), "{err}");
        assert!(err.contains("barrier #4 lap 1"), "{err}");
    }

    #[test]
    fn judge_tells_strangers_from_misconfigured_peers() {
        let mine = Hello {
            version: PROTOCOL_VERSION,
            rank: 1,
            world_size: 3,
            tag: "a".into(),
        };
        let same = Hello {
            rank: 0,
            ..mine.clone()
        };
        assert_eq!(judge(&mine, &same, 0).0, VERDICT_OK);
        let stranger = Hello {
            tag: "b".into(),
            ..same.clone()
        };
        assert_eq!(judge(&mine, &stranger, 0).0, VERDICT_RETRY);
        let wrong_world = Hello {
            world_size: 4,
            ..same.clone()
        };
        let (code, reason) = judge(&mine, &wrong_world, 0);
        assert_eq!(code, VERDICT_FATAL);
        assert!(reason.contains("world_size 4") && reason.contains("world_size 3"));
        assert_eq!(judge(&mine, &same, 2).0, VERDICT_FATAL);
    }

    /// Rings of `n` ranks on loopback, formed concurrently.
    fn rings(n: usize, timeout: Duration) -> Vec<TcpRing> {
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let peers = &peers;
                    s.spawn(move || TcpRing::connect(rank, peers, l, "unit", &secret(), timeout))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic").expect("ring forms"))
                .collect()
        })
    }

    /// The documented summation order, reproduced on one thread: chunk `c`
    /// is folded starting from rank `c`. The ring must match it bit for bit.
    #[test]
    fn sum_order_is_the_documented_one() {
        let n = 4;
        let len = 1003;
        // Values spanning many magnitudes so that the order matters.
        let inputs: Vec<Vec<f32>> = (0..n)
            .map(|r| {
                (0..len)
                    .map(|i| {
                        let x = ((i * 7919 + r * 104_729) % 1000) as f32 / 997.0 - 0.5;
                        x * 10f32.powi(((i + r) % 9) as i32 - 4)
                    })
                    .collect()
            })
            .collect();
        let mut expected = vec![0f32; len];
        for c in 0..n {
            for i in chunk_bounds(len, n, c) {
                let mut acc = inputs[c][i];
                for k in 1..n {
                    acc += inputs[(c + k) % n][i];
                }
                expected[i] = acc;
            }
        }
        let outputs: Vec<Vec<f32>> = thread::scope(|s| {
            let handles: Vec<_> = rings(n, Duration::from_secs(10))
                .into_iter()
                .zip(inputs.clone())
                .map(|(mut ring, mut buf)| {
                    s.spawn(move || {
                        ring.all_reduce_sum(&mut buf).expect("all-reduce");
                        buf
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for out in &outputs {
            assert_eq!(bits(out), bits(&expected));
        }
        // The rotated order really differs from a straight left-to-right sum
        // somewhere, or this test would not be telling anything apart.
        let straight: Vec<f32> = (0..len)
            .map(|i| inputs.iter().fold(0.0, |acc, x| acc + x[i]))
            .collect();
        assert_ne!(bits(&straight), bits(&expected));
    }

    fn secret() -> RingSecret {
        RingSecret::new(b"unit secret")
    }

    /// A stranger without the secret cannot make a rank fail, not even by
    /// claiming the right tag with the wrong world size (which a peer with
    /// the secret would be failed for): it is refused, and the rank keeps
    /// waiting for its real neighbour until its deadline.
    #[test]
    fn a_stranger_without_the_secret_is_refused_and_cannot_abort_the_ring() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr");
        let stranger = thread::spawn(move || {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                rank: 1,
                world_size: 3,
                tag: "unit".into(),
            };
            let stream = TcpStream::connect(address).expect("connect");
            let deadline = Instant::now() + Duration::from_secs(5);
            match handshake(&stream, &hello, &RingSecret::new(b"guess"), 0, deadline) {
                Err(HandshakeError::Retry(reason)) => reason,
                Err(HandshakeError::Fatal(e)) => e.to_string(),
                Ok(()) => "the handshake passed".into(),
            }
        });
        // Rank 0 of 2 waiting for its left neighbour, rank 1.
        let mine = Hello {
            version: PROTOCOL_VERSION,
            rank: 0,
            world_size: 2,
            tag: "unit".into(),
        };
        let timeout = Duration::from_secs(1);
        let deadline = Instant::now() + timeout;
        let abort = AtomicBool::new(false);
        let err = accept_left(&listener, &mine, &secret(), 1, deadline, timeout, &abort)
            .expect_err("no neighbour with the secret");
        let stranger_saw = stranger.join().expect("stranger");
        match err {
            CollectiveError::RendezvousTimeout { last_problem, .. } => {
                let problems = format!("{last_problem:?}");
                assert!(problems.contains("ring secret"), "{problems}");
            }
            other => panic!("expected a timeout, not {other}"),
        }
        assert!(stranger_saw.contains("ring secret"), "{stranger_saw}");
    }

    /// A peer that handshakes, starts an all-reduce and dies half-way
    /// through a chunk makes its neighbour fail fast with `PeerClosed`, and
    /// the ring stays broken afterwards.
    #[test]
    fn a_peer_dying_mid_chunk_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let fake_listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peers = vec![
            listener.local_addr().expect("addr").to_string(),
            fake_listener.local_addr().expect("addr").to_string(),
        ];
        let timeout = Duration::from_secs(20);
        let len = 100_000;
        let fake_peers = peers.clone();
        // Rank 1 of 2, speaking the wire format by hand after a real
        // rendezvous.
        let fake = thread::spawn(move || {
            let links = rendezvous(1, &fake_peers, &fake_listener, "unit", &secret(), timeout)
                .expect("fake rank joins");
            // Wait until rank 0 is inside the all-reduce: its header arrives.
            let mut their_header = [0u8; HEADER_BYTES];
            (&links.left).read_exact(&mut their_header).expect("header");
            let header = Header {
                op: Op::AllReduce,
                seq: 0,
                arg: len as u64,
            };
            let mut out = header.encode().to_vec();
            // Half of chunk 1, then gone.
            out.extend(std::iter::repeat_n(0u8, len / 2 / 2 * 4));
            (&links.right).write_all(&out).expect("partial chunk");
            links.shutdown();
        });
        let mut ring =
            TcpRing::connect(0, &peers, listener, "unit", &secret(), timeout).expect("ring forms");
        let started = Instant::now();
        let mut buf = vec![1.0f32; len];
        let err = ring.all_reduce_sum(&mut buf).expect_err("the peer died");
        assert!(
            matches!(
                err,
                CollectiveError::PeerClosed {
                    peer: 1,
                    op: "all_reduce"
                }
            ),
            "{err}"
        );
        assert!(
            started.elapsed() < timeout / 2,
            "failed fast, not by timeout"
        );
        let again = ring.barrier().expect_err("broken for good");
        assert!(matches!(again, CollectiveError::Broken(_)), "{again}");
        fake.join().expect("fake rank");
    }
}

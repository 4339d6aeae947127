//! Data-parallel collectives between learner ranks: summing gradients,
//! broadcasting small messages from one rank, and barriers.
//!
//! Where this sits: every learner rank computes gradients on its own share
//! of a batch, then calls [`Collective::all_reduce_sum`] on the flattened
//! gradients so that every rank steps its optimiser with the same sum and
//! the ranks keep identical weights. Rank 0 uses [`Collective::broadcast`]
//! to tell the others, e.g., the step it resumed from. The coordinator's
//! `LearnerAssignment` says which backend to use and who the peers are;
//! [`CollectiveConfig::from_assignment`] and [`connect`] turn it into a
//! `Box<dyn Collective>`.
//!
//! Two backends:
//! - [`TcpRing`]: ring all-reduce over plain TCP between the ranks'
//!   collective listeners (CPU ranks, tests, any cluster without NCCL);
//! - `Nccl` (module `nccl`, cargo feature `nccl`, included in `cuda`):
//!   NVIDIA NCCL between CUDA ranks.
//!
//! Design decisions:
//! - **Blocking API.** The learner runs its optimiser step on a blocking
//!   thread (`spawn_blocking`), and a collective is a point where the rank
//!   can do nothing but wait for its peers, so the calls block. That keeps
//!   the ring on `std::net` with real threads for full-duplex streaming
//!   instead of an async runtime inside the hot loop.
//! - **A trait object, not an enum.** The NCCL backend exists only with a
//!   cargo feature; a trait keeps the `cfg` in one place (the factory)
//!   rather than in every `match`, and lets learner tests drive the step
//!   with a `TcpRing` of one rank or a fake. The trait has no generic
//!   methods so `Box<dyn Collective>` works, and it is `Send` so the
//!   learner can move it into its blocking thread.
//! - **Bit-identical results.** Every rank must end an all-reduce with the
//!   same bytes, or the ranks' weights drift apart one rounding error at a
//!   time. Both backends compute each element's sum once, on one rank, and
//!   copy it to the others (see [`ring`] for the argument). The sum is not
//!   bit-identical to a straight `x0 + x1 + ...` on one machine (the ring
//!   adds in a rotated order per chunk), only within a few ulps of it.
//! - **Errors, not panics.** A peer that disconnects, times out or sends
//!   something unexpected yields a [`CollectiveError`] on every surviving
//!   rank; afterwards the collective is broken for good and the learner
//!   rebuilds it with the next assignment.
//! - **World size 1** is a no-op for every operation, so a single-rank
//!   learner runs the same code path.

use std::net::TcpListener;
use std::time::Duration;

use encore_proto::v1::{CollectiveBackend, LearnerAssignment};

pub mod ring;

#[cfg(feature = "nccl")]
pub mod nccl;

#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use ring::{RingSecret, TcpRing};

/// Length in bytes of an NCCL unique id (`ncclUniqueId`), as relayed by the
/// coordinator in `MemberStatus.nccl_unique_id` and
/// `LearnerAssignment.nccl_unique_id`.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// A group of learner ranks that can sum buffers, broadcast messages and
/// wait for each other.
///
/// Every rank of the group must make the same sequence of calls with the
/// same arguments (same buffer lengths, same root); a rank that deviates
/// gets an error, not a wrong answer, where the backend can tell (the TCP
/// ring checks every operation's kind, sequence number and length).
pub trait Collective: Send {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// The backend, for logs and metrics.
    fn backend(&self) -> CollectiveBackend;

    /// Replaces `buf` on every rank with the element-wise sum of all ranks'
    /// `buf`s. Blocks until this rank has its result. All ranks end with
    /// bit-identical buffers. A no-op for one rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// Replaces `buf` on every rank but `root` with `root`'s `buf` (any
    /// length; the other ranks need not know it in advance). Used for small
    /// messages such as the step number rank 0 resumed from.
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// Every rank's `mine`, in rank order, on every rank: one broadcast per
/// rank, for small messages (entry ids, a step and a weight hash).
pub fn all_gather(
    collective: &mut dyn Collective,
    mine: &[u8],
) -> Result<Vec<Vec<u8>>, CollectiveError> {
    (0..collective.world_size())
        .map(|root| {
            let mut bytes = if root == collective.rank() {
                mine.to_vec()
            } else {
                Vec::new()
            };
            collective.broadcast(&mut bytes, root)?;
            Ok(bytes)
        })
        .collect()
}

/// Why a collective operation or the forming of a group failed.
///
/// After any error other than [`CollectiveError::Config`] the collective is
/// broken: its connections are closed (so that the other ranks fail fast
/// too) and every later call returns [`CollectiveError::Broken`].
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The arguments cannot work (rank out of range, peer list of the wrong
    /// length, root out of range, missing NCCL id); the message names the
    /// offending value. Nothing was sent.
    #[error("invalid collective configuration: {0}")]
    Config(String),
    /// The group could not be formed before the deadline.
    #[error("rendezvous timed out after {timeout:?} waiting for {waiting_for}{}", last_problem.as_ref().map(|p| format!(" (last problem: {p})")).unwrap_or_default())]
    RendezvousTimeout {
        /// What this rank was still waiting for.
        waiting_for: String,
        /// The rendezvous timeout.
        timeout: Duration,
        /// The last thing that went wrong while waiting (connection refused,
        /// a peer from another job...), if any.
        last_problem: Option<String>,
    },
    /// A peer answered the rendezvous handshake with different parameters
    /// (world size, rank, protocol version) for the same ring: the ranks
    /// were configured inconsistently.
    #[error("handshake with {peer} refused: {reason}")]
    Handshake {
        /// The peer: rank and address.
        peer: String,
        /// What did not match, with both values.
        reason: String,
    },
    /// A peer closed its connection in the middle of an operation (it
    /// crashed, or failed itself and closed its links).
    #[error("rank {peer} closed the connection during {op}")]
    PeerClosed {
        /// The peer's rank.
        peer: usize,
        /// The operation (`all_reduce`, `broadcast`, `barrier`).
        op: &'static str,
    },
    /// A peer made no progress for longer than the I/O timeout.
    #[error("timed out after {timeout:?} waiting for rank {peer} during {op}")]
    Timeout {
        /// The peer's rank.
        peer: usize,
        /// The operation.
        op: &'static str,
        /// The I/O timeout.
        timeout: Duration,
    },
    /// Any other I/O error on a peer connection.
    #[error("I/O error with rank {peer} during {op}: {source}")]
    Io {
        /// The peer's rank.
        peer: usize,
        /// The operation.
        op: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A peer sent something other than what this rank expected: another
    /// operation, another sequence number or another buffer length. The
    /// ranks' call sequences have diverged.
    #[error("protocol error from rank {peer}: {detail}")]
    Protocol {
        /// The peer's rank.
        peer: usize,
        /// What was expected and what arrived.
        detail: String,
    },
    /// An earlier operation failed; this collective can no longer be used.
    #[error("collective is broken by an earlier error ({0}); form a new one")]
    Broken(String),
    /// The backend is not available in this build or on this machine
    /// (NCCL without the `nccl` feature, missing CUDA or NCCL libraries).
    #[error("{0}")]
    Unsupported(String),
    /// The NCCL or CUDA library reported an error.
    #[error("{0}")]
    Backend(String),
}

/// Everything needed to form a collective group, as the coordinator hands
/// it to a learner rank.
#[derive(Debug, Clone)]
pub struct CollectiveConfig {
    /// Which backend to use.
    pub backend: CollectiveBackend,
    /// This rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// `host:port` of every rank's collective listener, indexed by rank
    /// (this rank's own included). Required by the TCP ring.
    pub peer_addresses: Vec<String>,
    /// Identifies one formation of the ring; the TCP ring refuses peers
    /// with another tag, so a straggler from an earlier formation cannot
    /// join a new one.
    pub tag: String,
    /// The TCP ring's shared secret: a peer that cannot prove it holds the
    /// same one is refused.
    pub secret: RingSecret,
    /// NCCL only: the 128-byte unique id rank 0 generated with
    /// [`new_nccl_unique_id`].
    pub nccl_unique_id: Option<Vec<u8>>,
    /// NCCL only: the CUDA device of this rank.
    pub device_ordinal: usize,
    /// Deadline for forming the group, and (TCP ring) the longest an
    /// operation waits for a peer without progress. It must cover the
    /// largest skew between ranks arriving at a collective (a rank that
    /// checkpoints while the others wait).
    pub timeout: Duration,
}

impl CollectiveConfig {
    /// The configuration a learner assignment describes, for `job_id`.
    ///
    /// The ring tag is derived from the job and the ordered peer list, not
    /// from the assignment generation: generations count per member, so
    /// two ranks of the same ring may hold different ones, while the peer
    /// list is the same on every rank of one formation and changes when the
    /// ring is re-formed.
    pub fn from_assignment(
        job_id: &str,
        assignment: &LearnerAssignment,
        secret: RingSecret,
        timeout: Duration,
    ) -> Self {
        Self {
            backend: assignment.backend(),
            rank: assignment.rank as usize,
            world_size: assignment.world_size as usize,
            peer_addresses: assignment.peer_addresses.clone(),
            tag: ring_tag(job_id, &assignment.peer_addresses),
            secret,
            nccl_unique_id: assignment.nccl_unique_id.clone(),
            device_ordinal: assignment.device_ordinal.unwrap_or(0) as usize,
            timeout,
        }
    }
}

/// A ring tag for `job_id` and the ordered peer list: the job id followed
/// by a 64-bit FNV-1a hash of the addresses, stable across builds and
/// platforms (unlike `std`'s hasher, whose algorithm is unspecified).
pub fn ring_tag(job_id: &str, peer_addresses: &[String]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for address in peer_addresses {
        // The separator keeps ["ab", "c"] and ["a", "bc"] apart.
        for byte in address.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{job_id}/{hash:016x}")
}

/// Forms the collective group `config` describes and returns this rank's
/// handle. Blocks until every peer has joined or `config.timeout` passes.
///
/// `listener` is this rank's collective listener, already bound to the
/// address the coordinator advertises as this rank's peer address; the TCP
/// ring needs it when there is more than one rank, NCCL ignores it.
pub fn connect(
    config: &CollectiveConfig,
    listener: Option<TcpListener>,
) -> Result<Box<dyn Collective>, CollectiveError> {
    match config.backend {
        CollectiveBackend::TcpRing => {
            if config.peer_addresses.len() != config.world_size {
                return Err(CollectiveError::Config(format!(
                    "peer_addresses has {} entries but world_size is {}",
                    config.peer_addresses.len(),
                    config.world_size
                )));
            }
            let listener = match listener {
                Some(listener) => Some(listener),
                None if config.world_size <= 1 => None,
                None => {
                    return Err(CollectiveError::Config(
                        "the TCP ring needs this rank's bound listener".into(),
                    ));
                }
            };
            let ring = TcpRing::connect_with(
                config.rank,
                &config.peer_addresses,
                listener,
                &config.tag,
                &config.secret,
                config.timeout,
            )?;
            Ok(Box::new(ring))
        }
        CollectiveBackend::Nccl => connect_nccl(config),
        CollectiveBackend::Unspecified => Err(CollectiveError::Config(
            "backend is COLLECTIVE_BACKEND_UNSPECIFIED; the assignment must choose TCP_RING or NCCL"
                .into(),
        )),
    }
}

/// A fresh NCCL unique id, generated by rank 0 and relayed to the other
/// ranks by the coordinator (`MemberStatus.nccl_unique_id`).
///
/// Fails with [`CollectiveError::Unsupported`] in a build without the
/// `nccl` feature or where libnccl cannot be loaded.
pub fn new_nccl_unique_id() -> Result<[u8; NCCL_UNIQUE_ID_BYTES], CollectiveError> {
    #[cfg(feature = "nccl")]
    {
        Nccl::unique_id()
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(nccl_not_built())
    }
}

#[cfg(feature = "nccl")]
fn connect_nccl(config: &CollectiveConfig) -> Result<Box<dyn Collective>, CollectiveError> {
    let id = config.nccl_unique_id.as_deref().ok_or_else(|| {
        CollectiveError::Config(
            "the NCCL backend needs nccl_unique_id (rank 0 generates it, the coordinator relays it)"
                .into(),
        )
    })?;
    let id: &[u8; NCCL_UNIQUE_ID_BYTES] = id.try_into().map_err(|_| {
        CollectiveError::Config(format!(
            "nccl_unique_id has {} bytes, expected {NCCL_UNIQUE_ID_BYTES}",
            id.len()
        ))
    })?;
    let nccl = Nccl::new(config.rank, config.world_size, id, config.device_ordinal)?;
    Ok(Box::new(nccl))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(_config: &CollectiveConfig) -> Result<Box<dyn Collective>, CollectiveError> {
    Err(nccl_not_built())
}

#[cfg(not(feature = "nccl"))]
fn nccl_not_built() -> CollectiveError {
    CollectiveError::Unsupported(
        "the NCCL backend needs encore-learner built with the `cuda` feature (or `nccl`)".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_tag_depends_on_job_and_ordered_peers() {
        let peers = vec!["a:1".to_string(), "b:2".to_string()];
        let swapped = vec!["b:2".to_string(), "a:1".to_string()];
        let split = vec!["a:1b".to_string(), ":2".to_string()];
        let tag = ring_tag("job", &peers);
        assert_eq!(tag, ring_tag("job", &peers.clone()));
        assert!(tag.starts_with("job/"));
        assert_ne!(tag, ring_tag("other", &peers));
        assert_ne!(tag, ring_tag("job", &swapped));
        assert_ne!(tag, ring_tag("job", &split));
    }

    #[test]
    fn from_assignment_copies_the_ring() {
        let assignment = LearnerAssignment {
            rank: 1,
            world_size: 2,
            peer_addresses: vec!["h0:1".into(), "h1:1".into()],
            backend: CollectiveBackend::TcpRing as i32,
            device_ordinal: Some(3),
            ..Default::default()
        };
        let secret = RingSecret::new(b"s");
        let config = CollectiveConfig::from_assignment(
            "j",
            &assignment,
            secret.clone(),
            Duration::from_secs(9),
        );
        assert_eq!(config.secret, secret);
        assert_eq!(config.backend, CollectiveBackend::TcpRing);
        assert_eq!((config.rank, config.world_size), (1, 2));
        assert_eq!(config.peer_addresses, assignment.peer_addresses);
        assert_eq!(config.device_ordinal, 3);
        assert_eq!(config.tag, ring_tag("j", &assignment.peer_addresses));
    }

    #[test]
    fn unspecified_backend_and_bad_peer_lists_are_refused() {
        let mut config = CollectiveConfig {
            backend: CollectiveBackend::Unspecified,
            rank: 0,
            world_size: 1,
            peer_addresses: vec!["127.0.0.1:1".into()],
            tag: "t".into(),
            secret: RingSecret::new(b"s"),
            nccl_unique_id: None,
            device_ordinal: 0,
            timeout: Duration::from_secs(1),
        };
        let err = connect(&config, None)
            .err()
            .expect("unspecified is refused");
        assert!(err.to_string().contains("UNSPECIFIED"), "{err}");

        config.backend = CollectiveBackend::TcpRing;
        config.world_size = 2;
        let err = connect(&config, None).err().expect("1 address for 2 ranks");
        assert!(err.to_string().contains("world_size is 2"), "{err}");

        config.world_size = 1;
        let single = connect(&config, None).expect("one rank needs no listener");
        assert_eq!((single.rank(), single.world_size()), (0, 1));
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn nccl_without_the_feature_says_so() {
        let config = CollectiveConfig {
            backend: CollectiveBackend::Nccl,
            rank: 0,
            world_size: 1,
            peer_addresses: vec![],
            tag: "t".into(),
            secret: RingSecret::new(b"s"),
            nccl_unique_id: Some(vec![0; NCCL_UNIQUE_ID_BYTES]),
            device_ordinal: 0,
            timeout: Duration::from_secs(1),
        };
        let err = connect(&config, None).err().expect("no NCCL in this build");
        assert!(err.to_string().contains("`cuda` feature"), "{err}");
        assert!(new_nccl_unique_id().is_err());
    }
}

//! The coordinator as its callers see it: what actors, learner ranks,
//! reward servers and the CLI link to talk to the coordinator, without
//! linking the coordinator. The coordinator depends on this crate for the
//! pieces both sides share (the wire conversions of the queue, the weight
//! files' spool, the HTTP/2 settings), never the other way.
//!
//! ```text
//!  CoordinatorClient ── one channel, one token ──▶ cluster(), queue(), weights()
//!  stay_joined ──Register──▶ Membership (heartbeats, assignment, lost) ──▶ work ──▶ leave ─┐
//!       ▲                                                                                  │
//!       └─────────────────────────── lease lost: join again ──────────────────────────────┘
//!  open_queue(uri) ──▶ a Queue: the store itself (redis://) or QueueClient (coordinator://)
//!  weights::publish ──▶ WeightService.Publish        weights::fetch_to_file ◀── Fetch (resumable)
//! ```
//!
//! - [`member`]: [`CoordinatorClient`], [`Membership`] and the one join loop
//!   ([`member::stay_joined`]).
//! - [`queue`]: the rollout queue's client and its wire conversions.
//! - [`weights`]: publishing and resumable, verified fetching.
//! - [`spool`]: writing files that are never visible half-written.
//! - [`token`]: [`BearerToken`], the worker, member or client token every
//!   call carries.
//! - [`endpoint`]: the coordinator's URL, TLS towards it
//!   ([`CoordinatorTls`]) and HTTP/2 settings.

#![warn(missing_docs)]

pub mod endpoint;
pub mod member;
pub mod queue;
pub mod spool;
pub mod token;
pub mod weights;

pub use endpoint::CoordinatorTls;
pub use member::{CoordinatorClient, Membership, SOFTWARE_VERSION};
pub use token::BearerToken;

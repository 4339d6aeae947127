//! Encore's coordinator: the control plane.
//!
//! It serves three gRPC services over one [`Store`](encore_store::Store)
//! (embedded or Redis) and keeps no state of its own, so a restarted
//! coordinator reopens the store and carries on:
//!
//! ```text
//!  CLI ──JobService──▶ jobs: submit (spec::validate), get, list, cancel, watch
//!  actors, learner ranks, reward servers ──ClusterService──▶ register, heartbeat,
//!      assignments (reconcile: who works on which job), progress reports
//!  learner rank 0 ──WeightService.Publish──▶ blob dir + manifest ──Fetch──▶ actors
//! ```
//!
//! - `encore_spec` (its own crate, which workers read too): JobSpec
//!   validation (every bad field named by its path), defaults and the
//!   typed plan.
//! - [`jobs`]: the JobService.
//! - [`cluster`]: ClusterService; [`reconcile`] turns registered members
//!   and live jobs into assignments and moves jobs from PENDING to RUNNING.
//! - [`weights`]: WeightService, the blob directory and its garbage
//!   collection.
//! - [`queue`]: RolloutQueueService, the rollout queue of an embedded
//!   store for workers in other processes.
//! - [`auth`]: bearer tokens (clients and workers); [`config`]; [`error`]
//!   (the one conversion to `tonic::Status`); [`metrics`]; [`server`]
//!   (start-up, TLS, health, reflection, shutdown).

//!
//! The callers' side (membership, the queue client, weight publish and
//! fetch, tokens, TLS towards the coordinator) is the `encore-client` crate,
//! which workers and the CLI link instead of this one.

#![warn(missing_docs)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod error;
mod job_changes;
pub mod jobs;
pub mod metrics;
pub mod queue;
pub mod reconcile;
pub mod server;
pub mod weights;

pub use config::{Config, Flags};
pub use error::{Error, Result};
pub use server::{Coordinator, RunningCoordinator, run};

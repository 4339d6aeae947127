//! Encore's wire protocol, package `encore.v1`: the prost messages and the
//! tonic clients and servers generated from `proto/encore/v1/*.proto`.
//!
//! Every byte that crosses an Encore process boundary is one of these types:
//!
//! - the CLI submits and watches jobs through [`v1::job_service_client`],
//!   served by the coordinator;
//! - actors, learner ranks and reward servers join the cluster and receive
//!   their assignments through [`v1::cluster_service_client`];
//! - actors sample [`v1::Rollout`]s, get them scored through
//!   [`v1::reward_service_client`] (served by reward servers), and append
//!   [`v1::ScoredBatch`]es to the rollout queue, which learners consume;
//! - learner rank 0 publishes new policy weights through
//!   [`v1::weight_service_client`] and actors fetch them from the coordinator.
//!
//! The `.proto` files are the source of truth and document every field. Code
//! is generated at build time by `protox` and `tonic-prost-build`, so building
//! needs no `protoc`. [`FILE_DESCRIPTOR_SET`] holds the compiled descriptors
//! for gRPC reflection.

#![deny(missing_docs)]

pub mod status;

/// Generated messages, enums, clients (`*_client`) and servers (`*_server`)
/// of package `encore.v1`.
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("encore.v1");
}

/// The encoded `google.protobuf.FileDescriptorSet` of package `encore.v1`,
/// including the well-known types it imports and the source comments; what
/// `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`
/// expects.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/encore_v1_descriptor.bin"));

impl v1::JobState {
    /// Whether the job has finished for good: SUCCEEDED, FAILED or CANCELLED.
    /// A terminal job never changes state again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::v1::JobState;

    #[test]
    fn only_succeeded_failed_and_cancelled_are_terminal() {
        let terminal: Vec<JobState> = [
            JobState::Unspecified,
            JobState::Pending,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .filter(|state| state.is_terminal())
        .collect();
        assert_eq!(
            terminal,
            [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        );
    }
}

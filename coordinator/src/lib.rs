//! Encore coordinator: the control plane.
//!
//! Serves JobService (clients submit, watch and cancel training jobs),
//! ClusterService (actors, learner ranks and reward servers register and
//! hold leases) and WeightService (the learner publishes weight versions,
//! actors fetch them), keeping all state in a store (embedded or Redis) so a
//! restarted coordinator carries on.
//!
//! The services land with the coordinator issue (issue 4); the contracts are
//! in `proto/encore/v1/`.

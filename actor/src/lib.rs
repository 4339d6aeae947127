//! Encore actor: samples music from the job's current policy snapshot.
//!
//! Data flow: fetch weights of version v from the coordinator's
//! WeightService -> sample K clips per prompt with the KV-cached sampler
//! (`encore-model`) -> score them on the reward servers (RewardService) ->
//! push scored rollouts, tagged with v and their behaviour log-probs, to the
//! rollout queue.
//!
//! The process itself lands with the distributed RL loop (issue 5); this
//! crate fixes where it lives in the workspace.

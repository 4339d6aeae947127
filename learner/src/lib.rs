//! Encore learner: turns scored rollouts into policy updates.
//!
//! Data flow: consume scored rollouts from the rollout queue -> combine and
//! normalise rewards, leave-one-out baselines, KL to the frozen reference,
//! clipped importance-weighted policy gradient (`encore-model` log-probs) ->
//! all-reduce gradients across ranks (NCCL or a TCP ring) -> AdamW step ->
//! checkpoint -> publish weights through the coordinator.
//!
//! The process itself lands with the distributed RL loop (issue 5); this
//! crate fixes where it lives in the workspace.

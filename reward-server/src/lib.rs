//! Encore reward server: hosts reward models behind RewardService.
//!
//! Data flow: a batch of (prompt, tokens) arrives from an actor -> tokens are
//! decoded to audio by `encore-codec` -> log-mel features -> the prompt
//! adherence, quality and user-preference networks -> scores back to the
//! actor. Requests are batched dynamically across callers.
//!
//! The server lands with the reward-model issue (issue 3); the contract is
//! `proto/encore/v1/reward.proto`.

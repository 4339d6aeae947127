//! `encore serve ROLE [FLAGS]`: runs one of Encore's long-running
//! processes (coordinator, reward server, actor, learner rank) from the one
//! `encore` binary, with the flags of its own binary (`encore serve actor
//! --help`). `encore quickstart` starts its local cluster this way, so a
//! fresh clone needs to build only this binary.

use clap::{Args, Parser, ValueEnum};

/// The processes `encore serve` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The control plane: jobs, cluster membership, weights, the rollout
    /// queue of an embedded store (`encore-coordinator`).
    Coordinator,
    /// Serves reward models over gRPC (`encore-reward-server`).
    RewardServer,
    /// Samples rollouts and has them scored (`encore-actor`).
    Actor,
    /// A learner rank: policy updates and weight publishing
    /// (`encore-learner`).
    Learner,
}

impl Role {
    /// The name of the role's own binary (what its flags' help shows).
    pub fn binary(self) -> &'static str {
        match self {
            Role::Coordinator => "encore-coordinator",
            Role::RewardServer => "encore-reward-server",
            Role::Actor => "encore-actor",
            Role::Learner => "encore-learner",
        }
    }
}

/// Flags of `encore serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The process to run.
    role: Role,
    /// The role's own flags, as its binary takes them (`--help` lists
    /// them). Its configuration file and `ENCORE_<ROLE>__<KEY>` variables
    /// apply as usual.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    flags: Vec<String>,
}

/// Runs the role until SIGTERM or Ctrl-C.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let argv = std::iter::once(args.role.binary().to_owned()).chain(args.flags);
    let runtime = tokio::runtime::Runtime::new()?;
    match args.role {
        Role::Coordinator => {
            let flags = encore_coordinator::Flags::parse_from(argv);
            runtime.block_on(encore_coordinator::run(flags))?;
        }
        Role::RewardServer => {
            let flags = encore_reward_server::Flags::parse_from(argv);
            runtime.block_on(encore_reward_server::run(flags))?;
        }
        Role::Actor => {
            let flags = encore_actor::Flags::parse_from(argv);
            runtime.block_on(encore_actor::run(flags))?;
        }
        Role::Learner => {
            let flags = encore_learner::Flags::parse_from(argv);
            runtime.block_on(encore_learner::run(flags))?;
        }
    }
    Ok(())
}

//! Default settings that must let the processes share one machine: no two
//! processes default to the same fixed port, and processes a machine runs
//! several of (actors, learner ranks) default to a free port each.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use encore_telemetry::{AdminState, Readiness, serve_admin};
use tokio_util::sync::CancellationToken;

/// Every address a process binds by default, named `section.key`.
fn default_addresses() -> Vec<(&'static str, SocketAddr)> {
    let coordinator = encore_coordinator::Config::default();
    let reward_server = encore_reward_server::Config::default();
    let actor = encore_actor::Config::default();
    let learner = encore_learner::Config::default();
    let prefs = encore_prefs::server::Config::default();
    vec![
        ("coordinator.listen", coordinator.listen),
        ("coordinator.admin", coordinator.admin),
        ("reward_server.listen", reward_server.listen),
        ("reward_server.admin", reward_server.admin),
        ("actor.admin", actor.admin),
        ("learner.admin", learner.admin),
        ("learner.listen", learner.listen),
        ("prefs.listen", prefs.listen),
        ("prefs.http", prefs.http),
        ("prefs.admin", prefs.admin),
    ]
}

#[test]
fn no_two_processes_default_to_the_same_port() {
    let mut owners: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for (key, addr) in default_addresses() {
        if addr.port() != 0 {
            owners.entry(addr.port()).or_default().push(key);
        }
    }
    let shared: Vec<_> = owners.into_iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(shared.is_empty(), "ports shared by default: {shared:?}");
}

/// Two actors (or two learner ranks) started with the default settings on
/// one machine both bind their admin servers, as `run_with` does first.
#[tokio::test]
async fn two_actors_and_two_learner_ranks_with_default_settings_share_a_machine() {
    let stop = CancellationToken::new();
    let defaults = [
        ("actor.admin", encore_actor::Config::default().admin),
        ("learner.admin", encore_learner::Config::default().admin),
    ];
    let mut servers = Vec::new();
    for (key, addr) in defaults {
        for i in 0..2 {
            let state = AdminState::new(encore_telemetry::registry().clone(), Readiness::new());
            let (bound, task) = serve_admin(addr, state, stop.clone())
                .await
                .unwrap_or_else(|e| panic!("{key} of process {i} ({addr}): {e}"));
            servers.push((bound, task));
        }
    }
    stop.cancel();
    for (_, task) in servers {
        task.await.unwrap();
    }
}

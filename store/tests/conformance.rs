//! The store's conformance suite: every case runs against the embedded
//! backend (in a temp dir) and against the Redis backend (on a real
//! redis-server started for the test), through `Arc<dyn Store>` only, so
//! both backends are held to the same contract.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use encore_proto::v1::{JobState, MemberStatus, Role, job_event};
use encore_store::{
    AppendOutcome, CreateOutcome, EntryId, ManifestPut, QueueEntry, RecordPut, Registration, Store,
    StoreError, subscribe,
};
use support::{Harness, job, key, manifest, member, metric, state_change, state_of};
use tokio::time::Instant;
use tokio_stream::StreamExt;

/// Generates one test per case and backend: `embedded::case` and
/// `redis::case`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Harness::embedded().await).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Harness::redis().await).await;
                }
            )*
        }
    };
}

conformance!(
    create_is_idempotent_per_owner_and_key,
    list_pages_newest_first_stably_and_filters_by_state,
    update_is_compare_and_set,
    every_state_move_survives_a_restart,
    metrics_history_and_event_replay,
    watchers_wake_on_new_events_without_polling,
    leases_renew_and_expire_on_the_store_clock,
    member_records_are_compare_and_set,
    manifests_are_idempotent_monotonic_and_pinned_against_gc,
    queue_is_bounded_and_never_trims,
    each_entry_goes_to_exactly_one_consumer,
    unacked_entries_are_reclaimed_after_min_idle,
    blocking_read_wakes_on_append,
    a_blocked_reader_does_not_stall_other_calls,
    a_restart_loses_no_unacked_entry,
    concurrent_appends_lose_nothing,
    preference_records_are_idempotent_ordered_and_durable,
    clips_expire_on_the_store_clock,
);

const OWNER: &str = "alice";
const GROUP: &str = "learners";
const LONG: Duration = Duration::from_secs(30);

fn payload(i: usize) -> Vec<u8> {
    format!("batch-{i:04}").into_bytes()
}

async fn create(store: &Arc<dyn Store>, job_id: &str, state: JobState) {
    let outcome = store
        .create_job(job(job_id, state), OWNER, None)
        .await
        .unwrap();
    assert!(matches!(outcome, CreateOutcome::Created(_)), "{outcome:?}");
}

async fn create_is_idempotent_per_owner_and_key(h: Harness) {
    let store = h.store();

    let created = store
        .create_job(job("j1", JobState::Pending), OWNER, key("k1", "sha-a"))
        .await
        .unwrap();
    let CreateOutcome::Created(first) = created else {
        panic!("expected Created, got {created:?}");
    };
    assert_eq!(first.revision, 1);
    assert_eq!(first.owner, OWNER);

    // A retry (the coordinator drew a new job id for it) finds the first job.
    let retry = store
        .create_job(
            job("j1-retry", JobState::Pending),
            OWNER,
            key("k1", "sha-a"),
        )
        .await
        .unwrap();
    assert_eq!(retry, CreateOutcome::Existing(first.clone()));
    assert!(store.get_job("j1-retry").await.unwrap().is_none());

    // The same key with another spec changes nothing.
    let reused = store
        .create_job(job("j2", JobState::Pending), OWNER, key("k1", "sha-b"))
        .await
        .unwrap();
    assert_eq!(
        reused,
        CreateOutcome::KeyReused {
            job_id: "j1".into()
        }
    );
    assert!(store.get_job("j2").await.unwrap().is_none());

    // Keys are scoped to their owner.
    let other = store
        .create_job(job("j3", JobState::Pending), "bob", key("k1", "sha-b"))
        .await
        .unwrap();
    assert!(matches!(other, CreateOutcome::Created(_)), "{other:?}");

    // A taken job id without a matching key is a conflict.
    let taken = store
        .create_job(job("j1", JobState::Pending), OWNER, key("k2", "sha-a"))
        .await;
    assert!(
        matches!(taken, Err(StoreError::Conflict { kind: "job", .. })),
        "{taken:?}"
    );
    // ... and the failed call did not keep the key.
    let fresh = store
        .create_job(job("j4", JobState::Pending), OWNER, key("k2", "sha-a"))
        .await
        .unwrap();
    assert!(matches!(fresh, CreateOutcome::Created(_)), "{fresh:?}");

    // Bad input is refused by name.
    let unspecified = store
        .create_job(job("j5", JobState::Unspecified), OWNER, None)
        .await;
    assert!(
        matches!(
            unspecified,
            Err(StoreError::InvalidArgument {
                field: "job.state",
                ..
            })
        ),
        "{unspecified:?}"
    );
    let no_id = store
        .create_job(job("", JobState::Pending), OWNER, None)
        .await;
    assert!(
        matches!(
            no_id,
            Err(StoreError::InvalidArgument {
                field: "job.job_id",
                ..
            })
        ),
        "{no_id:?}"
    );

    assert_eq!(store.active_jobs_of(OWNER).await.unwrap(), 2);
    assert_eq!(store.active_jobs_of("bob").await.unwrap(), 1);
    assert_eq!(store.active_jobs_of("nobody").await.unwrap(), 0);
}

async fn list_pages_newest_first_stably_and_filters_by_state(h: Harness) {
    let store = h.store();
    for i in 1..=7 {
        create(&store, &format!("j{i}"), JobState::Pending).await;
    }
    for i in [2, 5, 6] {
        let id = format!("j{i}");
        let current = store.get_job(&id).await.unwrap().unwrap();
        let mut running = current.job.clone();
        running.state = JobState::Running as i32;
        store
            .update_job(running, current.revision, Vec::new())
            .await
            .unwrap();
    }

    let ids = |page: &encore_store::JobPage| -> Vec<String> {
        page.jobs.iter().map(|j| j.job.job_id.clone()).collect()
    };
    let first = store.list_jobs(None, &[], 3, None).await.unwrap();
    assert_eq!(ids(&first), ["j7", "j6", "j5"]);
    // A job created while paging does not shift the pages that follow.
    create(&store, "j8", JobState::Pending).await;
    let token = first.next_page_token.clone().expect("more pages");
    let second = store.list_jobs(None, &[], 3, Some(&token)).await.unwrap();
    assert_eq!(ids(&second), ["j4", "j3", "j2"]);
    let token = second.next_page_token.clone().expect("more pages");
    let third = store.list_jobs(None, &[], 3, Some(&token)).await.unwrap();
    assert_eq!(ids(&third), ["j1"]);
    assert_eq!(third.next_page_token, None);

    // The default page holds everything here, newest first.
    let all = store.list_jobs(None, &[], 0, None).await.unwrap();
    assert_eq!(ids(&all), ["j8", "j7", "j6", "j5", "j4", "j3", "j2", "j1"]);
    assert_eq!(all.next_page_token, None);

    let running = [JobState::Running];
    let page = store.list_jobs(None, &running, 2, None).await.unwrap();
    assert_eq!(ids(&page), ["j6", "j5"]);
    let token = page.next_page_token.clone().expect("more running jobs");
    let rest = store
        .list_jobs(None, &running, 2, Some(&token))
        .await
        .unwrap();
    assert_eq!(ids(&rest), ["j2"]);
    assert_eq!(rest.next_page_token, None);

    let both = store
        .list_jobs(None, &[JobState::Running, JobState::Pending], 100, None)
        .await
        .unwrap();
    assert_eq!(both.jobs.len(), 8);
    let none = store
        .list_jobs(None, &[JobState::Failed], 10, None)
        .await
        .unwrap();
    assert!(none.jobs.is_empty() && none.next_page_token.is_none());

    // A token only works with the filter it was issued for.
    let wrong = store.list_jobs(None, &[], 2, Some(&token)).await;
    assert!(
        matches!(
            wrong,
            Err(StoreError::InvalidArgument {
                field: "page_token",
                ..
            })
        ),
        "{wrong:?}"
    );
    let garbage = store.list_jobs(None, &[], 2, Some("not-a-token")).await;
    assert!(matches!(garbage, Err(StoreError::InvalidArgument { .. })));

    // By owner: bob's jobs lie between and below many of OWNER's, and pages
    // of his hold only his, as many as asked while more follow.
    for i in 1..=5 {
        let outcome = store
            .create_job(job(&format!("b{i}"), JobState::Pending), "bob", None)
            .await
            .unwrap();
        assert!(matches!(outcome, CreateOutcome::Created(_)), "{outcome:?}");
        create(&store, &format!("o{i}"), JobState::Pending).await;
        create(&store, &format!("p{i}"), JobState::Pending).await;
    }
    let mut bobs = Vec::new();
    let mut token = None;
    loop {
        let page = store
            .list_jobs(Some("bob"), &[], 2, token.as_deref())
            .await
            .unwrap();
        let more = page.next_page_token.is_some();
        assert!(page.jobs.len() == 2 || !more, "a short page before the end");
        assert!(page.jobs.iter().all(|j| j.owner == "bob"));
        bobs.extend(ids(&page));
        token = page.next_page_token;
        if !more {
            break;
        }
    }
    assert_eq!(bobs, ["b5", "b4", "b3", "b2", "b1"]);
    let running_of_bob = store
        .list_jobs(Some("bob"), &running, 10, None)
        .await
        .unwrap();
    assert!(running_of_bob.jobs.is_empty());
    let nobodys = store.list_jobs(Some("nobody"), &[], 3, None).await.unwrap();
    assert!(nobodys.jobs.is_empty() && nobodys.next_page_token.is_none());
    let owners = store.list_jobs(Some(OWNER), &[], 0, None).await.unwrap();
    assert_eq!(owners.jobs.len(), 8 + 10);

    let counts = store.count_jobs_by_state().await.unwrap();
    assert_eq!(counts[&JobState::Pending], 5 + 15);
    assert_eq!(counts[&JobState::Running], 3);
    assert_eq!(counts[&JobState::Succeeded], 0);
    assert_eq!(counts.len(), 5);
}

async fn update_is_compare_and_set(h: Harness) {
    let store = h.store();
    create(&store, "j1", JobState::Pending).await;

    let mut running = job("j1", JobState::Running);
    running.stage = "R".into();
    let updated = store
        .update_job(running.clone(), 1, Vec::new())
        .await
        .unwrap();
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.owner, OWNER);

    // A writer that read revision 1 loses.
    let stale = store.update_job(running.clone(), 1, Vec::new()).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { kind: "job", .. })),
        "{stale:?}"
    );

    // Two coordinators racing on the same revision: exactly one wins.
    let racers: Vec<_> = (0..2)
        .map(|i| {
            let store = store.clone();
            let mut next = running.clone();
            next.step = 10 + i;
            tokio::spawn(async move { store.update_job(next, 2, Vec::new()).await })
        })
        .collect();
    let mut wins = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(job) => {
                assert_eq!(job.revision, 3);
                wins += 1;
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(wins, 1);
    let current = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!(current.revision, 3);
    assert!([10, 11].contains(&current.job.step));

    let missing = store
        .update_job(job("nope", JobState::Running), 1, Vec::new())
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { kind: "job", .. })),
        "{missing:?}"
    );

    // A terminal job never changes state again, but may still be updated
    // in place (for example its latest metrics).
    let done = job("j1", JobState::Cancelled);
    store.update_job(done.clone(), 3, Vec::new()).await.unwrap();
    let revive = store
        .update_job(job("j1", JobState::Running), 4, Vec::new())
        .await;
    assert!(
        matches!(revive, Err(StoreError::JobTerminal { .. })),
        "{revive:?}"
    );
    let mut touched = done;
    touched.step = 99;
    let after = store.update_job(touched, 4, Vec::new()).await.unwrap();
    assert_eq!(after.revision, 5);
    assert_eq!(store.active_jobs_of(OWNER).await.unwrap(), 0);
}

async fn every_state_move_survives_a_restart(mut h: Harness) {
    {
        let store = h.store();
        let outcome = store
            .create_job(job("j1", JobState::Pending), OWNER, key("k1", "sha"))
            .await
            .unwrap();
        assert!(matches!(outcome, CreateOutcome::Created(_)));
        create(&store, "j2", JobState::Pending).await;
    }
    h.reopen().await;
    {
        let store = h.store();
        let mut running = job("j1", JobState::Running);
        running.stage = "R".into();
        let events = vec![state_change(
            JobState::Pending,
            JobState::Running,
            "resources ready",
        )];
        store.update_job(running, 1, events).await.unwrap();
    }
    h.reopen().await;
    {
        let store = h.store();
        let stored = store.get_job("j1").await.unwrap().unwrap();
        assert_eq!(state_of(&stored.job), JobState::Running);
        assert_eq!(stored.job.stage, "R");
        assert_eq!(stored.revision, 2);
        let mut done = stored.job.clone();
        done.state = JobState::Succeeded as i32;
        let events = vec![state_change(
            JobState::Running,
            JobState::Succeeded,
            "max steps",
        )];
        store.update_job(done, 2, events).await.unwrap();
    }
    h.reopen().await;
    let store = h.store();
    let stored = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!(state_of(&stored.job), JobState::Succeeded);
    assert_eq!(stored.revision, 3);
    assert_eq!(stored.owner, OWNER);

    // The history of moves, in order, with their sequences.
    let events = store.read_events("j1", 0, 0, Duration::ZERO).await.unwrap();
    let moves: Vec<(u64, i32)> = events
        .iter()
        .map(|e| match &e.event {
            Some(job_event::Event::StateChange(c)) => (e.sequence, c.state),
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(
        moves,
        [
            (1, JobState::Running as i32),
            (2, JobState::Succeeded as i32)
        ]
    );

    // Idempotency keys, creation order and counts survive too.
    let retry = store
        .create_job(job("j9", JobState::Pending), OWNER, key("k1", "sha"))
        .await
        .unwrap();
    assert!(matches!(retry, CreateOutcome::Existing(ref j) if j.job.job_id == "j1"));
    create(&store, "j3", JobState::Pending).await;
    let page = store.list_jobs(None, &[], 10, None).await.unwrap();
    let ids: Vec<&str> = page.jobs.iter().map(|j| j.job.job_id.as_str()).collect();
    assert_eq!(ids, ["j3", "j2", "j1"]);
    assert_eq!(store.active_jobs_of(OWNER).await.unwrap(), 2);
}

async fn metrics_history_and_event_replay(h: Harness) {
    let store = h.store();
    create(&store, "j1", JobState::Running).await;
    let stage = state_change(JobState::Pending, JobState::Running, "started");
    assert_eq!(store.append_events("j1", vec![stage]).await.unwrap(), 1);
    for step in 1..=5 {
        let sequence = store.append_metric("j1", metric(step)).await.unwrap();
        assert_eq!(sequence, step + 1);
    }
    assert_eq!(store.append_events("j1", Vec::new()).await.unwrap(), 6);

    let steps = |points: Vec<encore_proto::v1::MetricPoint>| -> Vec<u64> {
        points.iter().map(|p| p.step).collect()
    };
    assert_eq!(
        steps(store.metrics("j1", 0, 0).await.unwrap()),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(steps(store.metrics("j1", 2, 2).await.unwrap()), [3, 4]);
    assert_eq!(
        steps(store.metrics("j1", 5, 10).await.unwrap()),
        Vec::<u64>::new()
    );
    let point = &store.metrics("j1", 4, 1).await.unwrap()[0];
    assert_eq!(point, &metric(5));

    // Replay from any sequence, in order, sequences assigned by the store.
    let replay = store.read_events("j1", 3, 2, Duration::ZERO).await.unwrap();
    let sequences: Vec<u64> = replay.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [4, 5]);
    assert!(matches!(
        &replay[0].event,
        Some(job_event::Event::Metrics(p)) if p.step == 3
    ));
    assert!(replay[0].time.is_some());
    let tail = store.read_events("j1", 6, 0, Duration::ZERO).await.unwrap();
    assert!(tail.is_empty());

    // Snapshots are not history; unknown jobs are not found.
    let snapshot = encore_proto::v1::JobEvent {
        event: Some(job_event::Event::Snapshot(job("j1", JobState::Running))),
        ..Default::default()
    };
    let refused = store.append_events("j1", vec![snapshot]).await;
    assert!(
        matches!(refused, Err(StoreError::InvalidArgument { .. })),
        "{refused:?}"
    );
    let unknown = store.append_metric("nope", metric(1)).await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound { .. })),
        "{unknown:?}"
    );
    let unknown = store.read_events("nope", 0, 0, Duration::ZERO).await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound { .. })),
        "{unknown:?}"
    );
    let unknown = store.metrics("nope", 0, 0).await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound { .. })),
        "{unknown:?}"
    );
}

async fn watchers_wake_on_new_events_without_polling(h: Harness) {
    let store = h.store();
    create(&store, "j1", JobState::Pending).await;
    store.append_metric("j1", metric(1)).await.unwrap();

    // A watcher replays the history, then follows live events up to the
    // terminal state change.
    let mut watch = subscribe(store.clone(), "j1", 0);
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.sequence, 1);
    h.wait_for_blocked_reader("j1").await;
    let started = Instant::now();
    store
        .update_job(
            job("j1", JobState::Failed),
            1,
            vec![state_change(JobState::Pending, JobState::Failed, "boom")],
        )
        .await
        .unwrap();
    let terminal = tokio::time::timeout(LONG, watch.next())
        .await
        .expect("the watcher woke")
        .unwrap()
        .unwrap();
    assert_eq!(terminal.sequence, 2);
    assert!(matches!(
        terminal.event,
        Some(job_event::Event::StateChange(ref c)) if c.state == JobState::Failed as i32
    ));
    assert!(started.elapsed() < Duration::from_secs(5));

    // A bounded wait with nothing to read comes back empty after the wait.
    let started = Instant::now();
    let nothing = store
        .read_events("j1", 2, 0, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(nothing.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(50));

    // A blocked read returns as soon as an event arrives.
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.read_events("j1", 2, 0, LONG).await })
    };
    h.wait_for_blocked_reader("j1").await;
    let started = Instant::now();
    store.append_metric("j1", metric(2)).await.unwrap();
    let woke = reader.await.unwrap().unwrap();
    assert_eq!(woke.len(), 1);
    assert_eq!(woke[0].sequence, 3);
    assert!(started.elapsed() < Duration::from_secs(5));
}

async fn leases_renew_and_expire_on_the_store_clock(h: Harness) {
    let store = h.store();
    let ttl = Duration::from_secs(10);
    let start = store.now();

    let registered = store
        .register_member(member("m1", "pod-a", Role::Actor), ttl)
        .await
        .unwrap();
    let Registration::Registered(first) = registered else {
        panic!("expected Registered, got {registered:?}");
    };
    assert_eq!(first.lease_deadline, start + ttl);
    assert!(first.is_alive(store.now()));

    // A retried Register of the same instance gets the same member.
    let again = store
        .register_member(member("m1-retry", "pod-a", Role::Actor), ttl)
        .await
        .unwrap();
    assert_eq!(again, Registration::Existing(first.clone()));
    assert!(store.get_member("m1-retry").await.unwrap().is_none());

    h.clock.advance(Duration::from_secs(6));
    let status = MemberStatus {
        applied_generation: 3,
        in_flight: 2,
        ..MemberStatus::default()
    };
    let renewed = store
        .renew_lease("m1", ttl, Some(status.clone()))
        .await
        .unwrap();
    assert_eq!(renewed.lease_deadline, start + Duration::from_secs(16));
    assert_eq!(renewed.status.as_ref(), Some(&status));
    assert_eq!(renewed.revision, 1, "heartbeats do not bump the revision");
    // A renewal without status keeps the last one.
    h.clock.advance(Duration::from_secs(1));
    let kept = store.renew_lease("m1", ttl, None).await.unwrap();
    assert_eq!(kept.status.as_ref(), Some(&status));
    assert!(store.expired_members().await.unwrap().is_empty());

    // Not renewed within its TTL, the lease is gone for good.
    h.clock.advance(ttl);
    let expired = store.renew_lease("m1", ttl, None).await;
    assert!(
        matches!(expired, Err(StoreError::LeaseExpired { .. })),
        "{expired:?}"
    );
    let gone: Vec<String> = store
        .expired_members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.member.member_id)
        .collect();
    assert_eq!(gone, ["m1"]);
    let unknown = store.renew_lease("never", ttl, None).await;
    assert!(
        matches!(unknown, Err(StoreError::LeaseExpired { .. })),
        "{unknown:?}"
    );

    // The same instance registering again becomes a new member.
    let fresh = store
        .register_member(member("m2", "pod-a", Role::Actor), ttl)
        .await
        .unwrap();
    assert!(matches!(fresh, Registration::Registered(ref r) if r.member.member_id == "m2"));
    let by_instance = store.member_by_instance("pod-a").await.unwrap().unwrap();
    assert_eq!(by_instance.member.member_id, "m2");
    let taken = store
        .register_member(member("m2", "pod-b", Role::Actor), ttl)
        .await;
    assert!(
        matches!(taken, Err(StoreError::Conflict { kind: "member", .. })),
        "{taken:?}"
    );

    let learner = store
        .register_member(member("m3", "pod-c", Role::Learner), ttl)
        .await
        .unwrap();
    assert!(matches!(learner, Registration::Registered(_)));
    let ids = |members: Vec<encore_store::MemberRecord>| -> Vec<String> {
        members.into_iter().map(|m| m.member.member_id).collect()
    };
    assert_eq!(
        ids(store.list_members(None).await.unwrap()),
        ["m1", "m2", "m3"]
    );
    assert_eq!(
        ids(store.list_members(Some(Role::Actor)).await.unwrap()),
        ["m1", "m2"]
    );
    assert_eq!(
        ids(store.list_members(Some(Role::Learner)).await.unwrap()),
        ["m3"]
    );

    // The reaper removes the expired member; its instance stays with m2.
    assert!(store.remove_member("m1").await.unwrap());
    assert!(!store.remove_member("m1").await.unwrap());
    assert!(store.expired_members().await.unwrap().is_empty());
    let by_instance = store.member_by_instance("pod-a").await.unwrap().unwrap();
    assert_eq!(by_instance.member.member_id, "m2");
    assert!(store.remove_member("m2").await.unwrap());
    assert!(store.member_by_instance("pod-a").await.unwrap().is_none());
    assert_eq!(
        ids(store.list_members(Some(Role::Actor)).await.unwrap()),
        Vec::<String>::new()
    );

    let bad = store
        .register_member(member("m4", "pod-d", Role::Unspecified), ttl)
        .await;
    assert!(
        matches!(
            bad,
            Err(StoreError::InvalidArgument {
                field: "member.role",
                ..
            })
        ),
        "{bad:?}"
    );
}

async fn member_records_are_compare_and_set(mut h: Harness) {
    let ttl = Duration::from_secs(30);
    {
        let store = h.store();
        let registered = store
            .register_member(member("m1", "pod-a", Role::Learner), ttl)
            .await
            .unwrap();
        assert!(matches!(registered, Registration::Registered(_)));
        let mut assigned = member("m1", "pod-a", Role::Learner);
        assigned.assignment = Some(encore_proto::v1::Assignment {
            member_id: "m1".into(),
            generation: 1,
            job_id: "j1".into(),
            ..Default::default()
        });
        let updated = store.update_member(assigned.clone(), 1).await.unwrap();
        assert_eq!(updated.revision, 2);
        assert_eq!(
            updated.lease_deadline,
            store.now() + ttl,
            "the lease is kept"
        );

        let stale = store.update_member(assigned.clone(), 1).await;
        assert!(
            matches!(stale, Err(StoreError::Conflict { kind: "member", .. })),
            "{stale:?}"
        );
        let mut other_role = assigned.clone();
        other_role.role = Role::Actor as i32;
        let refused = store.update_member(other_role, 2).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::InvalidArgument {
                    field: "member.role",
                    ..
                })
            ),
            "{refused:?}"
        );
        let mut other_instance = assigned;
        other_instance.instance_id = "pod-z".into();
        let refused = store.update_member(other_instance, 2).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::InvalidArgument {
                    field: "member.instance_id",
                    ..
                })
            ),
            "{refused:?}"
        );
        let missing = store
            .update_member(member("zz", "pod-z", Role::Actor), 1)
            .await;
        assert!(
            matches!(missing, Err(StoreError::NotFound { .. })),
            "{missing:?}"
        );
        store
            .renew_lease(
                "m1",
                ttl,
                Some(MemberStatus {
                    applied_generation: 1,
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
    }
    h.reopen().await;
    let store = h.store();
    let member = store.get_member("m1").await.unwrap().unwrap();
    assert_eq!(member.revision, 2);
    assert!(member.is_alive(store.now()));
    let assignment = member.member.assignment.expect("assignment survives");
    assert_eq!(
        (assignment.generation, assignment.job_id.as_str()),
        (1, "j1")
    );
    assert_eq!(member.status.map(|s| s.applied_generation), Some(1));
    let by_instance = store.member_by_instance("pod-a").await.unwrap().unwrap();
    assert_eq!(by_instance.member.member_id, "m1");
}

async fn manifests_are_idempotent_monotonic_and_pinned_against_gc(mut h: Harness) {
    {
        let store = h.store();
        for version in 0..=2 {
            let put = store
                .put_manifest(manifest("j1", version, &format!("sha{version}")))
                .await
                .unwrap();
            assert_eq!(
                put,
                ManifestPut::Committed(manifest("j1", version, &format!("sha{version}")))
            );
        }
        // A retried publish changes nothing; a different file under the same
        // version is refused.
        let mut retry = manifest("j1", 1, "sha1");
        retry.publisher_id = "someone else".into();
        let again = store.put_manifest(retry).await.unwrap();
        assert_eq!(
            again,
            ManifestPut::AlreadyCommitted(manifest("j1", 1, "sha1"))
        );
        let conflict = store.put_manifest(manifest("j1", 1, "other")).await;
        assert!(
            matches!(
                conflict,
                Err(StoreError::Conflict {
                    kind: "weight version",
                    ..
                })
            ),
            "{conflict:?}"
        );
        let skipped_back = store.put_manifest(manifest("j1", 2, "sha2")).await.unwrap();
        assert!(matches!(skipped_back, ManifestPut::AlreadyCommitted(_)));

        let versions = |list: Vec<encore_proto::v1::WeightManifest>| -> Vec<u64> {
            list.iter()
                .map(|m| m.version.as_ref().unwrap().version)
                .collect()
        };
        assert_eq!(
            versions(store.list_manifests("j1").await.unwrap()),
            [2, 1, 0]
        );
        let latest = store.latest_manifest("j1").await.unwrap().unwrap();
        assert_eq!(latest.version.unwrap().version, 2);
        assert!(store.get_manifest("j1", 7).await.unwrap().is_none());
        assert!(store.latest_manifest("other").await.unwrap().is_none());

        // GC deletes v1; the bar for new versions stays where it was.
        assert!(store.delete_manifest("j1", 1).await.unwrap());
        assert!(!store.delete_manifest("j1", 1).await.unwrap());
        let back = store.put_manifest(manifest("j1", 1, "sha1")).await;
        assert!(
            matches!(
                back,
                Err(StoreError::VersionNotMonotonic {
                    version: 1,
                    latest: 2,
                    ..
                })
            ),
            "{back:?}"
        );
        assert_eq!(versions(store.list_manifests("j1").await.unwrap()), [2, 0]);

        // A reader's pin keeps v2 from GC until it lapses or is released.
        let deadline = store
            .pin("j1", 2, "actor-1", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(deadline, store.now() + Duration::from_secs(30));
        store
            .pin("j1", 0, "actor-2", Duration::from_secs(5))
            .await
            .unwrap();
        let missing = store.pin("j1", 1, "actor-1", Duration::from_secs(30)).await;
        assert!(
            matches!(missing, Err(StoreError::NotFound { .. })),
            "{missing:?}"
        );
        assert_eq!(
            store.pinned_versions("j1").await.unwrap(),
            BTreeSet::from([0, 2])
        );
        let pinned = store.delete_manifest("j1", 2).await;
        assert!(
            matches!(pinned, Err(StoreError::Pinned { version: 2, .. })),
            "{pinned:?}"
        );
    }
    h.reopen().await;
    let store = h.store();
    // Pins, the high-water mark and the retained versions survive a restart.
    assert_eq!(
        store.pinned_versions("j1").await.unwrap(),
        BTreeSet::from([0, 2])
    );
    let back = store.put_manifest(manifest("j1", 1, "sha1")).await;
    assert!(
        matches!(back, Err(StoreError::VersionNotMonotonic { .. })),
        "{back:?}"
    );
    h.clock.advance(Duration::from_secs(6));
    assert_eq!(
        store.pinned_versions("j1").await.unwrap(),
        BTreeSet::from([2])
    );
    assert!(store.unpin("j1", 2, "actor-1").await.unwrap());
    assert!(!store.unpin("j1", 2, "actor-1").await.unwrap());
    assert!(store.pinned_versions("j1").await.unwrap().is_empty());
    assert!(store.delete_manifest("j1", 2).await.unwrap());
    // The lapsed pin on v0 does not hold GC either.
    assert!(store.delete_manifest("j1", 0).await.unwrap());
    assert!(store.latest_manifest("j1").await.unwrap().is_none());
    let next = store.put_manifest(manifest("j1", 3, "sha3")).await.unwrap();
    assert!(matches!(next, ManifestPut::Committed(_)));
}

async fn queue_is_bounded_and_never_trims(h: Harness) {
    let store = h.store();
    assert_eq!(store.queue_appended("j1").await.unwrap(), 0);
    let mut ids = Vec::new();
    for i in 0..3 {
        match store.queue_append("j1", payload(i), 3).await.unwrap() {
            AppendOutcome::Appended(id) => ids.push(id),
            full => panic!("append {i}: {full:?}"),
        }
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    assert_eq!(
        store.queue_append("j1", payload(3), 3).await.unwrap(),
        AppendOutcome::Full { len: 3 }
    );
    assert_eq!(store.queue_len("j1").await.unwrap(), 3);

    // Delivered but unacknowledged entries still count.
    let read = store
        .queue_read("j1", GROUP, "c1", 2, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), ids[..2]);
    assert_eq!(read[0].payload, payload(0));
    assert!(matches!(
        store.queue_append("j1", payload(3), 3).await.unwrap(),
        AppendOutcome::Full { len: 3 }
    ));

    // Acknowledging makes room; nothing was dropped along the way.
    assert_eq!(store.queue_ack("j1", GROUP, &[ids[0]]).await.unwrap(), 1);
    assert_eq!(store.queue_len("j1").await.unwrap(), 2);
    assert!(matches!(
        store.queue_append("j1", payload(3), 3).await.unwrap(),
        AppendOutcome::Appended(_)
    ));
    let rest = store
        .queue_read("j1", GROUP, "c1", 10, Duration::ZERO)
        .await
        .unwrap();
    let payloads: Vec<Vec<u8>> = rest.into_iter().map(|e| e.payload).collect();
    assert_eq!(payloads, [payload(2), payload(3)]);
    // Appends count, refused ones do not, and acknowledging takes none
    // back: appended = acknowledged + still queued.
    assert_eq!(store.queue_appended("j1").await.unwrap(), 4);
    assert_eq!(store.queue_len("j1").await.unwrap(), 3);
    assert_eq!(store.queue_appended("j2").await.unwrap(), 0);

    let zero = store.queue_append("j1", payload(9), 0).await;
    assert!(matches!(
        zero,
        Err(StoreError::InvalidArgument {
            field: "max_len",
            ..
        })
    ));
}

async fn each_entry_goes_to_exactly_one_consumer(h: Harness) {
    let store = h.store();
    const N: usize = 40;
    for i in 0..N {
        let outcome = store.queue_append("j1", payload(i), 1000).await.unwrap();
        assert!(matches!(outcome, AppendOutcome::Appended(_)));
    }
    let consumers: Vec<_> = ["learner-0", "learner-1"]
        .into_iter()
        .map(|consumer| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = store
                        .queue_read("j1", GROUP, consumer, 3, Duration::ZERO)
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch);
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut per_consumer: Vec<Vec<QueueEntry>> = Vec::new();
    for consumer in consumers {
        per_consumer.push(consumer.await.unwrap());
    }
    let a: BTreeSet<EntryId> = per_consumer[0].iter().map(|e| e.id).collect();
    let b: BTreeSet<EntryId> = per_consumer[1].iter().map(|e| e.id).collect();
    assert!(a.is_disjoint(&b), "an entry went to both consumers");
    assert_eq!(a.len() + b.len(), N);
    assert_eq!(store.queue_pending("j1", GROUP).await.unwrap(), N as u64);
    let payloads: BTreeSet<Vec<u8>> = per_consumer
        .iter()
        .flatten()
        .map(|e| e.payload.clone())
        .collect();
    assert_eq!(payloads, (0..N).map(payload).collect());

    let all: Vec<EntryId> = a.union(&b).copied().collect();
    // Acknowledging twice counts once; unknown ids and groups count nothing.
    assert_eq!(store.queue_ack("j1", GROUP, &all[..5]).await.unwrap(), 5);
    assert_eq!(
        store.queue_ack("j1", GROUP, &all).await.unwrap(),
        (N - 5) as u64
    );
    assert_eq!(store.queue_ack("j1", GROUP, &all).await.unwrap(), 0);
    assert_eq!(
        store.queue_ack("j1", "no-such-group", &all).await.unwrap(),
        0
    );
    assert_eq!(store.queue_len("j1").await.unwrap(), 0);
    assert_eq!(store.queue_pending("j1", GROUP).await.unwrap(), 0);
    assert_eq!(store.queue_pending("j1", "no-such-group").await.unwrap(), 0);
    assert!(
        store
            .queue_read("j1", GROUP, "learner-0", 10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn unacked_entries_are_reclaimed_after_min_idle(h: Harness) {
    let store = h.store();
    for i in 0..5 {
        let _ = store.queue_append("j1", payload(i), 100).await.unwrap();
    }
    // Learner A takes all five, finishes a step with two, then crashes.
    let taken = store
        .queue_read("j1", GROUP, "a", 5, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(taken.len(), 5);
    let done: Vec<EntryId> = taken[..2].iter().map(|e| e.id).collect();
    assert_eq!(store.queue_ack("j1", GROUP, &done).await.unwrap(), 2);

    // Wide enough that a loaded machine does not let it pass between the
    // read and the early claim (Redis measures it in real time).
    let min_idle = Duration::from_millis(500);
    let early = store
        .queue_claim_stale("j1", GROUP, "b", min_idle, 10)
        .await
        .unwrap();
    assert!(early.is_empty(), "claimed before min_idle: {early:?}");
    assert!(
        store
            .queue_read("j1", GROUP, "b", 10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );

    h.let_queue_idle(min_idle + Duration::from_millis(100))
        .await;
    let first = store
        .queue_claim_stale("j1", GROUP, "b", min_idle, 2)
        .await
        .unwrap();
    let second = store
        .queue_claim_stale("j1", GROUP, "b", min_idle, 10)
        .await
        .unwrap();
    let reclaimed: Vec<QueueEntry> = first.into_iter().chain(second).collect();
    assert_eq!(
        reclaimed,
        taken[2..].to_vec(),
        "the unacknowledged three, once each"
    );

    // Claiming restarts the idle time: a third learner gets nothing now.
    let again = store
        .queue_claim_stale("j1", GROUP, "c", min_idle, 10)
        .await
        .unwrap();
    assert!(again.is_empty());
    let ids: Vec<EntryId> = reclaimed.iter().map(|e| e.id).collect();
    assert_eq!(store.queue_ack("j1", GROUP, &ids).await.unwrap(), 3);
    assert_eq!(store.queue_len("j1").await.unwrap(), 0);
    assert_eq!(store.queue_pending("j1", GROUP).await.unwrap(), 0);
    let none = store
        .queue_claim_stale("j1", "no-such-group", "b", Duration::ZERO, 10)
        .await
        .unwrap();
    assert!(none.is_empty());
}

async fn blocking_read_wakes_on_append(h: Harness) {
    let store = h.store();
    // Nothing to read: a bounded block returns empty when it runs out.
    let started = Instant::now();
    let empty = store
        .queue_read("j1", GROUP, "c1", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(empty.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(50));

    // Two readers wait; each reports what it got on a channel.
    let (tx, mut results) = tokio::sync::mpsc::unbounded_channel();
    for consumer in ["c1", "c2"] {
        let (store, tx) = (store.clone(), tx.clone());
        tokio::spawn(async move {
            let read = store.queue_read("j1", GROUP, consumer, 10, LONG).await;
            let _ = tx.send(read);
        });
    }
    h.wait_for_blocked_reader("j1").await;
    let started = Instant::now();
    let AppendOutcome::Appended(id) = store.queue_append("j1", payload(1), 10).await.unwrap()
    else {
        panic!("queue full");
    };
    // One reader gets the entry at once; the other keeps waiting until a
    // second entry arrives.
    let first = tokio::time::timeout(LONG, results.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        results.try_recv().is_err(),
        "the other reader is still waiting"
    );
    let AppendOutcome::Appended(second_id) =
        store.queue_append("j1", payload(2), 10).await.unwrap()
    else {
        panic!("queue full");
    };
    let second = tokio::time::timeout(LONG, results.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.iter().map(|e| e.id).collect::<Vec<_>>(), [second_id]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

async fn a_blocked_reader_does_not_stall_other_calls(h: Harness) {
    let store = h.store();
    create(&store, "j1", JobState::Running).await;
    let queue_reader = {
        let store = store.clone();
        tokio::spawn(async move { store.queue_read("j1", GROUP, "c1", 1, LONG).await })
    };
    let event_reader = {
        let store = store.clone();
        tokio::spawn(async move { store.read_events("j1", 0, 0, LONG).await })
    };
    h.wait_for_blocked_reader("j1").await;
    // Everything else goes on while both readers wait.
    let started = Instant::now();
    for i in 0..20 {
        store.get_job("j1").await.unwrap().unwrap();
        store.queue_len("j1").await.unwrap();
        let _ = store.queue_append("other", payload(i), 100).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls stalled behind a blocked reader: {:?}",
        started.elapsed()
    );
    let _ = store.queue_append("j1", payload(0), 100).await.unwrap();
    store.append_metric("j1", metric(1)).await.unwrap();
    let entries = tokio::time::timeout(LONG, queue_reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entries.len(), 1);
    let events = tokio::time::timeout(LONG, event_reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(events.len(), 1);
}

async fn a_restart_loses_no_unacked_entry(mut h: Harness) {
    let last_id;
    {
        let store = h.store();
        for i in 0..6 {
            let _ = store.queue_append("j1", payload(i), 100).await.unwrap();
        }
        let taken = store
            .queue_read("j1", GROUP, "a", 3, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            store.queue_ack("j1", GROUP, &[taken[0].id]).await.unwrap(),
            1
        );
        let AppendOutcome::Appended(id) = store.queue_append("j1", payload(6), 100).await.unwrap()
        else {
            panic!("queue full");
        };
        last_id = id;
        // Acknowledge the newest one too, so that the restarted store must
        // remember ids it no longer holds.
        let rest = store
            .queue_read("j1", GROUP, "a", 10, Duration::ZERO)
            .await
            .unwrap();
        let newest = rest.last().unwrap().id;
        assert_eq!(newest, last_id);
        assert_eq!(store.queue_ack("j1", GROUP, &[newest]).await.unwrap(), 1);
    }
    h.reopen().await;
    let store = h.store();
    assert_eq!(store.queue_len("j1").await.unwrap(), 5);

    // Whatever a restarted learner gets by claiming the stale entries and
    // then reading is exactly the five unacknowledged ones, each once (both
    // backends keep the delivered ones pending for a claim).
    let mut recovered: Vec<QueueEntry> = store
        .queue_claim_stale("j1", GROUP, "a2", Duration::ZERO, 100)
        .await
        .unwrap();
    recovered.extend(
        store
            .queue_read("j1", GROUP, "a2", 100, Duration::ZERO)
            .await
            .unwrap(),
    );
    recovered.sort_by_key(|e| e.id);
    let payloads: Vec<Vec<u8>> = recovered.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(payloads, (1..6).map(payload).collect::<Vec<_>>());

    // Ids keep growing after the restart.
    let AppendOutcome::Appended(next) = store.queue_append("j1", payload(7), 100).await.unwrap()
    else {
        panic!("queue full");
    };
    assert!(next > last_id, "{next} after {last_id}");
}

async fn concurrent_appends_lose_nothing(h: Harness) {
    let store = h.store();
    const TASKS: usize = 8;
    const EACH: usize = 25;
    let writers: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..EACH {
                    match store
                        .queue_append("j1", payload(t * EACH + i), 10_000)
                        .await
                        .unwrap()
                    {
                        AppendOutcome::Appended(id) => ids.push(id),
                        full => panic!("{full:?}"),
                    }
                }
                ids
            })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for writer in writers {
        let written = writer.await.unwrap();
        assert!(written.windows(2).all(|w| w[0] < w[1]));
        ids.extend(written);
    }
    assert_eq!(ids.len(), TASKS * EACH, "every append got its own id");
    assert_eq!(store.queue_len("j1").await.unwrap(), (TASKS * EACH) as u64);

    let mut delivered = Vec::new();
    loop {
        let batch = store
            .queue_read("j1", GROUP, "c", 64, Duration::ZERO)
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        delivered.extend(batch);
    }
    assert!(
        delivered.windows(2).all(|w| w[0].id < w[1].id),
        "delivered in id order"
    );
    let payloads: BTreeSet<Vec<u8>> = delivered.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(payloads, (0..TASKS * EACH).map(payload).collect());
    let delivered_ids: BTreeSet<EntryId> = delivered.iter().map(|e| e.id).collect();
    assert_eq!(delivered_ids, ids);
}

async fn preference_records_are_idempotent_ordered_and_durable(mut h: Harness) {
    {
        let store = h.store();
        assert_eq!(
            store.put_preference("r1", "k1", payload(1)).await.unwrap(),
            RecordPut::Stored(1)
        );
        assert_eq!(
            store.put_preference("r2", "k1", payload(2)).await.unwrap(),
            RecordPut::Stored(2),
            "the key is per rater"
        );
        // A retried submission: the first one's sequence, nothing stored.
        assert_eq!(
            store.put_preference("r1", "k1", payload(9)).await.unwrap(),
            RecordPut::Duplicate(1)
        );
        // Fields cannot be confused by a separator in them.
        assert_eq!(
            store.put_preference("r1:k", "1", payload(3)).await.unwrap(),
            RecordPut::Stored(3)
        );
        for (field, result) in [
            ("rater", store.put_preference("", "k", payload(0)).await),
            ("key", store.put_preference("r", "", payload(0)).await),
        ] {
            assert!(
                matches!(result, Err(StoreError::InvalidArgument { field: f, .. }) if f == field),
                "{field}"
            );
        }
    }
    h.reopen().await;
    let store = h.store();
    let all = store.list_preferences(0, 100).await.unwrap();
    assert_eq!(
        all,
        vec![(1, payload(1)), (2, payload(2)), (3, payload(3))],
        "in order, survived the restart"
    );
    assert_eq!(
        store.list_preferences(1, 1).await.unwrap(),
        vec![(2, payload(2))]
    );
    assert!(store.list_preferences(3, 10).await.unwrap().is_empty());
    assert_eq!(
        store.put_preference("r1", "k1", payload(9)).await.unwrap(),
        RecordPut::Duplicate(1),
        "keys survive a restart too"
    );
    assert_eq!(
        store.put_preference("r1", "k2", payload(4)).await.unwrap(),
        RecordPut::Stored(4)
    );
}

async fn clips_expire_on_the_store_clock(h: Harness) {
    let store = h.store();
    store
        .put_clip("c1", payload(1), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.get_clip("c1").await.unwrap(), Some(payload(1)));
    assert_eq!(store.get_clip("c2").await.unwrap(), None);
    h.clock.advance(Duration::from_secs(59));
    assert_eq!(store.get_clip("c1").await.unwrap(), Some(payload(1)));
    h.clock.advance(Duration::from_secs(2));
    assert_eq!(store.get_clip("c1").await.unwrap(), None, "expired");
    // Put again: a fresh lease on life.
    store
        .put_clip("c1", payload(2), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.get_clip("c1").await.unwrap(), Some(payload(2)));
    assert!(matches!(
        store.put_clip("", payload(0), LONG).await,
        Err(StoreError::InvalidArgument { .. })
    ));
}

//! The preference service over gRPC on loopback, on the embedded store:
//! pairs are generated and kept, comparisons are stored once per rater and
//! client key, and malformed submissions (unknown clip, missing choice,
//! oversized prompt, a flood from one rater, one bad entry in a batch) are
//! refused with the right status naming the field, changing nothing.

use std::sync::Arc;

use candle_core::Device;
use encore_model::{Preset, TrainablePolicy};
use encore_prefs::{HostedPolicy, Limits, PreferenceServer, Preferences};
use encore_proto::v1::preference_service_client::PreferenceServiceClient;
use encore_proto::v1::preference_service_server::PreferenceServiceServer;
use encore_proto::v1::{
    Choice, ClipPair, Comparison, GetPairRequest, StartSessionRequest, StoredComparison,
    SubmitComparisonsRequest,
};
use encore_store::{EmbeddedOptions, EmbeddedStore, Store, SystemClock};
use prost::Message;
use tonic::Code;
use tonic::transport::{Channel, Server};
use tonic_types::StatusExt;

struct Fixture {
    client: PreferenceServiceClient<Channel>,
    /// A session per rater name the test uses.
    raters: std::sync::Mutex<std::collections::HashMap<String, String>>,
    registry: prometheus::Registry,
    service: Arc<Preferences>,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn fixture(limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(
            dir.path().join("store"),
            EmbeddedOptions::default(),
            Arc::new(SystemClock),
        )
        .unwrap(),
    );
    let policy = |seed| HostedPolicy {
        name: format!("policy-{seed}"),
        policy: Arc::new(
            TrainablePolicy::fresh(&Preset::Tiny.config(), &Device::Cpu, seed)
                .unwrap()
                .frozen()
                .unwrap(),
        ),
        version: seed,
    };
    let registry = prometheus::Registry::new();
    let service = Arc::new(
        Preferences::new(store.clone(), vec![policy(1), policy(2)], limits)
            .with_metrics(&registry)
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .add_service(PreferenceServiceServer::new(PreferenceServer(
            service.clone(),
        )))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    let client = PreferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Fixture {
        client,
        raters: Default::default(),
        registry,
        service,
        store,
        _dir: dir,
    }
}

fn small() -> Limits {
    Limits {
        clip_frames: 16,
        ..Limits::default()
    }
}

impl Fixture {
    /// The rater id of the session started for `name` (one per name).
    fn rater(&self, name: &str) -> String {
        self.raters
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_insert_with(|| self.service.start_session().unwrap())
            .clone()
    }
}

async fn pair(f: &mut Fixture, rater: &str) -> ClipPair {
    let rater_id = f.rater(rater);
    f.client
        .get_pair(GetPairRequest {
            prompt: "a calm solo piano piece".into(),
            rater_id,
            ..GetPairRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// A comparison of `pair` by the rater with id `rater`.
fn comparison(pair: &ClipPair, rater: &str, key: &str, choice: Choice) -> Comparison {
    Comparison {
        client_key: key.into(),
        rater_id: rater.into(),
        clip_a: pair.a.as_ref().unwrap().clip_id.clone(),
        clip_b: pair.b.as_ref().unwrap().clip_id.clone(),
        choice: choice as i32,
        rating_a: 4,
        rating_b: 0,
    }
}

async fn stored(f: &Fixture) -> Vec<StoredComparison> {
    f.store
        .list_preferences(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| StoredComparison::decode(bytes.as_slice()).unwrap())
        .collect()
}

fn field_of(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

fn reason_of(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_served_pair_is_compared_and_stored_once() {
    let mut f = fixture(small()).await;
    let p = pair(&mut f, "rater-1").await;
    let (a, b) = (p.a.clone().unwrap(), p.b.clone().unwrap());
    assert_eq!(p.prompt, "a calm solo piano piece");
    assert_eq!((a.tokens.len(), b.tokens.len()), (16, 16));
    assert_eq!(
        (a.policy.as_str(), b.policy.as_str()),
        ("policy-1", "policy-2")
    );
    assert_ne!(a.clip_id, b.clip_id);
    assert_eq!(a.audio_path, format!("clips/{}.wav", a.clip_id));
    let wav = f.service.clip_wav(&a.clip_id).await.unwrap();
    assert_eq!(&wav[..4], b"RIFF");

    let submit = |c: Comparison| SubmitComparisonsRequest {
        comparisons: vec![c],
    };
    let first = f
        .client
        .submit_comparisons(submit(comparison(&p, &f.rater("rater-1"), "k1", Choice::A)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.results[0].record, first.results[0].stored),
        (1, true)
    );
    // A retry (same rater and key) is recognised, not stored again.
    let retry = f
        .client
        .submit_comparisons(submit(comparison(&p, &f.rater("rater-1"), "k1", Choice::A)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retry.results[0].record, retry.results[0].stored),
        (1, false)
    );
    let records = stored(&f).await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.prompt, "a calm solo piano piece");
    assert_eq!(
        r.a.as_ref().unwrap().tokens,
        a.tokens,
        "the record holds the clips in full"
    );
    assert_eq!(r.b.as_ref().unwrap().policy_version, 2);
    assert_eq!(
        (r.choice, r.rating_a, r.rater_id.as_str()),
        (Choice::A as i32, 4, f.rater("rater-1").as_str())
    );
    assert!(r.time.is_some());

    // A suggested prompt when none is typed.
    let suggested = f
        .client
        .get_pair(GetPairRequest {
            rater_id: f.rater("rater-1"),
            ..GetPairRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(f.service.suggestions().contains(&suggested.prompt));
}

#[tokio::test]
async fn malformed_submissions_are_refused_naming_the_cause_and_change_nothing() {
    let mut f = fixture(Limits {
        comparisons_per_minute: 5,
        ..small()
    })
    .await;
    let p = pair(&mut f, "rater-1").await;
    let other = pair(&mut f, "rater-1").await;
    let submit = |comparisons: Vec<Comparison>| SubmitComparisonsRequest { comparisons };

    // Unknown clip.
    let mut unknown = comparison(&p, &f.rater("rater-1"), "k1", Choice::B);
    unknown.clip_a = "c-never-served".into();
    let err = f
        .client
        .submit_comparisons(submit(vec![unknown]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(reason_of(&err), "UNKNOWN_CLIP");
    assert!(
        err.message().contains("comparisons[0].clip_a"),
        "{}",
        err.message()
    );

    // Missing choice, a rating out of range, a missing key: every field named.
    let mut bad = comparison(&p, &f.rater("rater-1"), "", Choice::Unspecified);
    bad.rating_b = 9;
    let err = f
        .client
        .submit_comparisons(submit(vec![bad]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        field_of(&err),
        [
            "comparisons[0].client_key",
            "comparisons[0].choice",
            "comparisons[0].rating_b"
        ]
    );

    // A pair made of clips generated for two different prompts.
    let third = f
        .client
        .get_pair(GetPairRequest {
            prompt: "fast energetic drums".into(),
            rater_id: f.rater("rater-1"),
            ..GetPairRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut mixed = comparison(&p, &f.rater("rater-1"), "k2", Choice::A);
    mixed.clip_b = third.b.unwrap().clip_id;
    let err = f
        .client
        .submit_comparisons(submit(vec![mixed]))
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), ["comparisons[0].clip_b"]);

    // One bad entry fails the whole batch: the good one is not stored.
    let good = comparison(&other, &f.rater("rater-1"), "k3", Choice::A);
    let mut no_rater = comparison(&other, "", "k4", Choice::A);
    no_rater.rater_id.clear();
    let err = f
        .client
        .submit_comparisons(submit(vec![good, no_rater]))
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), ["comparisons[1].rater_id"]);

    // An oversized prompt.
    let err = f
        .client
        .get_pair(GetPairRequest {
            prompt: "x".repeat(1001),
            rater_id: f.rater("rater-1"),
            ..GetPairRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(field_of(&err), ["prompt"]);
    assert_eq!(reason_of(&err), "TOO_LARGE");

    assert!(stored(&f).await.is_empty(), "nothing refused was stored");

    // A flood from one rater: the first 5 a minute pass, then
    // RESOURCE_EXHAUSTED with a RetryInfo; another rater is unaffected.
    let flood: Vec<Comparison> = (0..5)
        .map(|i| comparison(&p, &f.rater("flooder"), &format!("f{i}"), Choice::A))
        .collect();
    f.client.submit_comparisons(submit(flood)).await.unwrap();
    let err = f
        .client
        .submit_comparisons(submit(vec![comparison(
            &p,
            &f.rater("flooder"),
            "f5",
            Choice::A,
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason_of(&err), "RATE_LIMITED");
    assert!(err.get_error_details().retry_info().is_some());
    f.client
        .submit_comparisons(submit(vec![comparison(
            &p,
            &f.rater("someone-else"),
            "s1",
            Choice::B,
        )]))
        .await
        .unwrap();
    assert_eq!(
        stored(&f).await.len(),
        6,
        "5 from the flooder, 1 from the other rater"
    );

    // What the metrics saw.
    let count = |name: &str, labels: &[(&str, &str)]| -> f64 {
        f.registry
            .gather()
            .iter()
            .filter(|fam| fam.name() == name)
            .flat_map(|fam| fam.get_metric().to_vec())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    };
    assert_eq!(
        count("encore_prefs_comparisons_total", &[("state", "stored")]),
        6.0
    );
    assert_eq!(count("encore_prefs_pairs_total", &[]), 3.0);
    let refused = |code| {
        count(
            "encore_prefs_refused_total",
            &[("method", "SubmitComparisons"), ("code", code)],
        )
    };
    assert_eq!(
        (
            refused("NOT_FOUND"),
            refused("INVALID_ARGUMENT"),
            refused("RESOURCE_EXHAUSTED")
        ),
        (1.0, 3.0, 1.0)
    );
}

/// Stored comparisons come out as the preference dataset `encore reward
/// train preference` reads, and the filters pick what they say.
#[tokio::test]
async fn comparisons_export_as_preference_records_with_filters() {
    use encore_prefs::export::{Filter, export};
    use encore_raters::records::{Choice as RecordChoice, PreferenceRecord, Validate};

    let mut f = fixture(small()).await;
    let agreed = pair(&mut f, "r1").await;
    let disputed = pair(&mut f, "r1").await;
    let submit = |comparisons: Vec<Comparison>| SubmitComparisonsRequest { comparisons };
    f.client
        .submit_comparisons(submit(vec![
            comparison(&agreed, &f.rater("r1"), "k1", Choice::A),
            comparison(&agreed, &f.rater("r2"), "k1", Choice::A),
            comparison(&disputed, &f.rater("r1"), "k2", Choice::A),
            comparison(&disputed, &f.rater("r2"), "k2", Choice::Neither),
        ]))
        .await
        .unwrap();

    let run = |filter: Filter| {
        let store = f.store.clone();
        async move {
            let mut out = Vec::new();
            let exported = export(&*store, &filter, &mut out).await.unwrap();
            let records: Vec<PreferenceRecord> = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(exported.written, records.len());
            assert_eq!(exported.read, 4);
            records
        }
    };
    let all = run(Filter::default()).await;
    assert_eq!(all.len(), 4);
    for r in &all {
        r.validate().unwrap();
        assert_eq!(r.caption, "a calm solo piano piece");
        assert_eq!(r.b.policy_version.as_deref(), Some("policy-2@2"));
    }
    assert_eq!(all[0].pair_id, all[1].pair_id, "two raters, one pair");
    assert_eq!(all[3].choice, RecordChoice::Tie);

    let agreeing = run(Filter {
        min_agreement: 1.0,
        ..Filter::default()
    })
    .await;
    assert_eq!(agreeing.len(), 2, "the disputed pair is left out");
    assert!(agreeing.iter().all(|r| r.pair_id == all[0].pair_id));
    assert_eq!(
        run(Filter {
            policy_version: Some("policy-1@1".into()),
            ..Filter::default()
        })
        .await
        .len(),
        4
    );
    assert!(
        run(Filter {
            policy_version: Some("7".into()),
            ..Filter::default()
        })
        .await
        .is_empty()
    );
    let future = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 60_000;
    assert!(
        run(Filter {
            since_ms: Some(future),
            ..Filter::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        run(Filter {
            until_ms: Some(future),
            ..Filter::default()
        })
        .await
        .len(),
        4
    );
}

/// 200 clients on loopback submit comparisons at once, each also retrying
/// one of its submissions: every comparison is stored exactly once, none
/// is lost, and the retries are recognised. Prints submissions/s and the
/// latency percentiles (a figure, not a bound: the machine is shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_lose_and_duplicate_nothing() {
    const CLIENTS: usize = 200;
    const EACH: usize = 5;
    let mut f = fixture(Limits {
        sessions_per_minute: 1000,
        ..small()
    })
    .await;
    let mut pairs = Vec::new();
    for _ in 0..10 {
        pairs.push(pair(&mut f, "setup").await);
    }
    let pairs = Arc::new(pairs);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (mut client, pairs) = (f.client.clone(), pairs.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let rater = client
                    .start_session(StartSessionRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .rater_id;
                for i in 0..=EACH {
                    // The last call retries the first submission.
                    let key = format!("k{}", i % EACH);
                    let p = &pairs[(c + i) % pairs.len()];
                    let t = std::time::Instant::now();
                    let answer = client
                        .submit_comparisons(SubmitComparisonsRequest {
                            comparisons: vec![comparison(p, &rater, &key, Choice::B)],
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    latencies.push(t.elapsed());
                    assert_eq!(answer.results[0].stored, i < EACH, "{rater} {key}");
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let took = started.elapsed();
    let records = stored(&f).await;
    assert_eq!(
        records.len(),
        CLIENTS * EACH,
        "every comparison stored once"
    );
    let distinct: std::collections::BTreeSet<(String, String)> = records
        .iter()
        .map(|r| (r.rater_id.clone(), r.client_key.clone()))
        .collect();
    assert_eq!(distinct.len(), CLIENTS * EACH, "no duplicates");
    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "{CLIENTS} clients, {} submissions (incl. {CLIENTS} retries) in {took:.2?}: {:.0} submissions/s, p50 {:.1?}, p99 {:.1?}",
        latencies.len(),
        latencies.len() as f64 / took.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
}

#[tokio::test]
async fn only_rater_ids_the_service_issued_are_taken_and_sessions_are_limited() {
    let mut f = fixture(Limits {
        sessions_per_minute: 3,
        ..small()
    })
    .await;
    let submit = |comparisons: Vec<Comparison>| SubmitComparisonsRequest { comparisons };
    // A session over gRPC, and one kept by the fixture: two of three.
    let rater = f
        .client
        .start_session(StartSessionRequest {})
        .await
        .unwrap()
        .into_inner()
        .rater_id;
    let p = pair(&mut f, "kept").await;

    // Made-up rater ids are refused, naming the field, and nothing is
    // stored; the issued one works.
    let made_up = f
        .client
        .get_pair(GetPairRequest {
            rater_id: "web-made-up".into(),
            ..GetPairRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(made_up.code(), Code::Unauthenticated, "{made_up:?}");
    assert!(made_up.message().contains("rater_id"), "{made_up:?}");
    let batch = vec![
        comparison(&p, &rater, "k1", Choice::A),
        comparison(&p, &format!("{rater}0"), "k2", Choice::A),
    ];
    let err = f
        .client
        .submit_comparisons(submit(batch))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("comparisons[1].rater_id"), "{err:?}");
    assert!(stored(&f).await.is_empty());
    f.client
        .submit_comparisons(submit(vec![comparison(&p, &rater, "k1", Choice::A)]))
        .await
        .unwrap();

    // Sessions are limited over all callers: the fourth this minute waits.
    f.client
        .start_session(StartSessionRequest {})
        .await
        .unwrap();
    let err = f
        .client
        .start_session(StartSessionRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason_of(&err), "RATE_LIMITED");
}

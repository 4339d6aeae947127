//! The reward server's Score and DescribeModels, end to end: a real server
//! on 127.0.0.1:0 with real (tiny, untrained) reward models, spoken to
//! through the generated gRPC client.

mod common;

use candle_core::Device;
use common::{MAX_TOKENS, TestServer, clips, request, test_config, tiny_model, violations};
use encore_proto::v1::{DescribeModelsRequest, RewardKind as ProtoKind, ScoreItem};
use encore_reward::{CODEC_ID, RewardKind, RewardModel, ScoreInput};
use encore_reward_server::{Config, Gate, ModelSpec, load_models};
use tonic::Code;
use tonic_types::StatusExt;

/// The name each kind is hosted under in these tests.
fn name(kind: RewardKind) -> String {
    format!("{}-v1", kind.name())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_match_the_models_called_directly_for_all_three_kinds() {
    // Checkpoints on disk, so the server loads them as in production and
    // reports their real sha256.
    let dir = tempfile::tempdir().unwrap();
    let mut specs = Vec::new();
    for (seed, kind) in RewardKind::ALL.into_iter().enumerate() {
        let path = dir.path().join(kind.name());
        tiny_model(kind, seed as u64).save(&path).unwrap();
        specs.push(ModelSpec {
            name: name(kind),
            path,
        });
    }
    let config = Config {
        models: specs.clone(),
        ..test_config()
    };
    let models = load_models(&config).await.unwrap();
    let mut t = TestServer::start(config, models, Gate::new()).await;

    // Items of different lengths, so the batch is padded.
    let mut items = clips(100, 0, 3);
    items.extend(clips(40, 10, 2));
    items.push(clips(150, 20, 1).remove(0));
    let response = t.scores(items.clone(), &[]).await;

    let inputs: Vec<ScoreInput<'_>> = items
        .iter()
        .map(|i| ScoreInput::tokens(&i.caption, &i.tokens))
        .collect();
    for spec in &specs {
        let direct = RewardModel::load(&spec.path, &Device::Cpu).unwrap();
        let expected = direct.score(&inputs).unwrap();
        for (i, (result, want)) in response.results.iter().zip(&expected).enumerate() {
            let got = result.scores[&spec.name].value;
            assert!(
                (got - f64::from(*want)).abs() < 1e-5,
                "{} item {i}: served {got}, direct {want}",
                spec.name
            );
        }
        assert_eq!(response.model_sha256[&spec.name], direct.sha256());
        assert_eq!(direct.sha256().len(), 64);
    }

    // Naming one model scores with that one only.
    let only = t
        .client
        .score(request(items[..2].to_vec(), &[&name(RewardKind::Quality)]))
        .await
        .unwrap()
        .into_inner();
    assert!(only.results.iter().all(|r| r.scores.len() == 1));
    assert_eq!(only.model_sha256.len(), 1);
    assert_eq!(
        only.results[1].scores[&name(RewardKind::Quality)].value,
        response.results[1].scores[&name(RewardKind::Quality)].value
    );

    // DescribeModels lists them sorted by name, with kinds and hashes.
    let described = t
        .client
        .describe_models(DescribeModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let names: Vec<&str> = described.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["adherence-v1", "preference-v1", "quality-v1"]);
    let kinds: Vec<ProtoKind> = described.iter().map(|m| m.kind()).collect();
    assert_eq!(
        kinds,
        [
            ProtoKind::PromptAdherence,
            ProtoKind::UserPreference,
            ProtoKind::Quality
        ]
    );
    for info in &described {
        assert_eq!(info.sha256, response.model_sha256[&info.name]);
        let input = info.input.as_ref().unwrap();
        assert_eq!(input.min_tokens, 4);
        assert_eq!(input.max_tokens as usize, MAX_TOKENS);
        assert_eq!(input.vocab_size as usize, encore_codec::VOCAB_SIZE);
        assert_eq!(input.codec, CODEC_ID);
        assert_eq!(input.frame_rate_hz, f64::from(encore_codec::FRAME_RATE));
        assert_eq!(input.sample_rate_hz, encore_codec::SAMPLE_RATE);
        assert_eq!(input.uses_caption, info.kind() != ProtoKind::Quality);
        assert_eq!(input.max_batch_items, 256);
        assert_eq!(input.max_caption_bytes, 1024);
        assert!(info.version.starts_with("test-"));
        let output = info.output.as_ref().unwrap();
        assert!(!output.description.is_empty());
    }
    let quality = &described[2];
    assert_eq!(
        (
            quality.output.as_ref().unwrap().min,
            quality.output.as_ref().unwrap().max
        ),
        (Some(1.0), Some(5.0))
    );
    assert_eq!(described[1].output.as_ref().unwrap().min, None);

    // Every request was counted, per model.
    assert_eq!(
        t.metric(r#"encore_reward_requests_total{code="OK",model="quality-v1"}"#)
            .await,
        2.0
    );
    assert_eq!(
        t.metric(r#"encore_reward_items_total{model="quality-v1"}"#)
            .await,
        8.0
    );
    t.stop().await;
}

/// One bad request and what the server must say about it.
struct Case {
    what: &'static str,
    request: encore_proto::v1::ScoreRequest,
    field: &'static str,
    reason: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field_and_the_server_carries_on() {
    let config = Config {
        max_request_items: 4,
        queue_capacity: 4,
        max_caption_bytes: 200,
        ..test_config()
    };
    let models = vec![
        ("adherence", tiny_model(RewardKind::Adherence, 1)),
        ("quality", tiny_model(RewardKind::Quality, 2)),
    ];
    let mut t = TestServer::start(config, models, Gate::new()).await;

    let good = || clips(50, 0, 2);
    let with = |f: &dyn Fn(&mut Vec<ScoreItem>)| {
        let mut items = good();
        f(&mut items);
        request(items, &[])
    };
    let vocab = encore_codec::VOCAB_SIZE as u32;
    let cases = vec![
        Case {
            what: "no items",
            request: request(vec![], &[]),
            field: "items",
            reason: "INVALID_FIELD",
        },
        Case {
            what: "too many items",
            request: request(clips(50, 0, 5), &[]),
            field: "items",
            reason: "TOO_LARGE",
        },
        Case {
            what: "empty caption",
            request: with(&|items| items[1].caption.clear()),
            field: "items[1].caption",
            reason: "INVALID_FIELD",
        },
        Case {
            what: "oversized caption",
            request: with(&|items| items[0].caption = "x".repeat(201)),
            field: "items[0].caption",
            reason: "TOO_LARGE",
        },
        Case {
            what: "no tokens",
            request: with(&|items| items[1].tokens.clear()),
            field: "items[1].tokens",
            reason: "INVALID_FIELD",
        },
        Case {
            what: "too few tokens",
            request: with(&|items| items[0].tokens.truncate(3)),
            field: "items[0].tokens",
            reason: "INVALID_FIELD",
        },
        Case {
            what: "too many tokens",
            request: with(&|items| items[1].tokens = vec![5; MAX_TOKENS + 1]),
            field: "items[1].tokens",
            reason: "TOO_LARGE",
        },
        Case {
            what: "token out of vocabulary",
            request: with(&|items| items[1].tokens[3] = vocab),
            field: "items[1].tokens[3]",
            reason: "TOKEN_OUT_OF_RANGE",
        },
        Case {
            what: "unknown model",
            request: request(good(), &["quality", "loudness"]),
            field: "models[1]",
            reason: "UNKNOWN_MODEL",
        },
        Case {
            what: "duplicated model",
            request: request(good(), &["quality", "quality"]),
            field: "models[1]",
            reason: "INVALID_FIELD",
        },
    ];
    let n_cases = cases.len();
    for case in cases {
        let status = t.client.score(case.request).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{}: {status:?}",
            case.what
        );
        assert!(
            status.message().contains(case.field),
            "{}: the message {:?} does not name {}",
            case.what,
            status.message(),
            case.field
        );
        let details = status.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, case.reason, "{}", case.what);
        assert_eq!(info.domain, "encore.v1");
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations.len(), 1, "{}: {violations:?}", case.what);
        assert_eq!(violations[0].field, case.field, "{}", case.what);
        assert_eq!(violations[0].reason, case.reason, "{}", case.what);
    }

    // Several problems at once: all are named.
    let mut items = good();
    items[0].caption.clear();
    items[1].tokens[7] = vocab + 5;
    let status = t.client.score(request(items, &["nope"])).await.unwrap_err();
    let fields = violations(&status);
    assert_eq!(fields.len(), 3, "{fields:?}");
    assert_eq!(fields["models[0]"], "UNKNOWN_MODEL");
    assert_eq!(fields["items[0].caption"], "INVALID_FIELD");
    assert_eq!(fields["items[1].tokens[7]"], "TOKEN_OUT_OF_RANGE");

    // Nothing was scored, and the server still serves.
    let ok = t
        .client
        .score(request(good(), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.results.len(), 2);
    assert_eq!(
        t.metric(r#"encore_reward_items_total{model="quality"}"#)
            .await,
        2.0
    );
    // Refusals are counted under the models the requests used; requests
    // naming no hosted model under "unknown".
    let refused = t
        .metric(r#"encore_reward_requests_total{code="INVALID_ARGUMENT",model="quality"}"#)
        .await
        + t.metric(r#"encore_reward_requests_total{code="INVALID_ARGUMENT",model="unknown"}"#)
            .await;
    assert!(refused >= (n_cases - 2) as f64, "{refused}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_scored_in_shared_batches() {
    const REQUESTS: usize = 8;
    let config = Config {
        max_batch_items: REQUESTS,
        // Generous: the batch closes as soon as it is full, and waiting
        // this long only happens if requests trickle in very slowly.
        max_wait_ms: 10_000,
        ..test_config()
    };
    // Through a checkpoint, so the reference below has the very same
    // weights.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quality");
    tiny_model(RewardKind::Quality, 3).save(&path).unwrap();
    let load = || RewardModel::load(&path, &Device::Cpu).unwrap();
    let t = TestServer::start(config, vec![("quality", load())], Gate::new()).await;

    let items = clips(60, 100, REQUESTS);
    let tasks: Vec<_> = items
        .iter()
        .map(|item| {
            let mut client = t.client.clone();
            let req = request(vec![item.clone()], &[]);
            tokio::spawn(async move { client.score(req).await })
        })
        .collect();
    let mut served = Vec::new();
    for task in tasks {
        served.push(task.await.unwrap().unwrap().into_inner().results[0].scores["quality"].value);
    }

    // Batched scores equal scores of each clip alone.
    let alone = load();
    for (item, got) in items.iter().zip(&served) {
        let want = alone
            .score(&[ScoreInput::tokens(&item.caption, &item.tokens)])
            .unwrap()[0];
        assert!((got - f64::from(want)).abs() < 1e-5, "{got} vs {want}");
    }

    let batches = t
        .metric(r#"encore_reward_batch_size_items_count{model="quality"}"#)
        .await;
    let scored = t
        .metric(r#"encore_reward_batch_size_items_sum{model="quality"}"#)
        .await;
    assert_eq!(scored, REQUESTS as f64);
    assert!(
        batches < REQUESTS as f64,
        "{REQUESTS} requests took {batches} forward passes: nothing was batched"
    );
    // The histogram has a batch above 1 item.
    let single = t
        .metric(r#"encore_reward_batch_size_items_bucket{model="quality",le="1"}"#)
        .await;
    assert!(single < batches, "every batch held one item");
    t.stop().await;
}

//! The loop the service exists for: simulated listeners (the raters
//! crate's personas) ask the service for pairs, hear them (judge the
//! clips' tokens) and submit their choices through the API; the export
//! trains a preference model, whose held-out accuracy is printed and must
//! be well above chance.
//!
//! The two hosted policies differ the way a tuned policy and an untuned one
//! do: one pretrained briefly on the corpus, one untrained, so the
//! listeners' preferences carry signal about the audio.

use std::sync::Arc;

use candle_core::Device;
use encore_model::pretrain::PretrainConfig;
use encore_model::{Preset, TrainablePolicy};
use encore_prefs::export::{Filter, export};
use encore_prefs::{HostedPolicy, Limits, Preferences};
use encore_proto::v1::{Choice, Comparison, GetPairRequest, SubmitComparisonsRequest};
use encore_raters::Population;
use encore_raters::records::{Choice as RaterChoice, PreferenceRecord};
use encore_reward_train::{self as train, Evaluation, TrainConfig};
use encore_store::{EmbeddedOptions, EmbeddedStore, Store, SystemClock};
use rand::SeedableRng;

const PAIRS: usize = 300;
const FRAMES: usize = 48;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_collected_through_the_api_train_a_preference_model() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let pretrain = PretrainConfig {
        preset: Preset::Tiny,
        steps: 80,
        batch_size: 8,
        warmup_steps: 10,
        eval_every: 80,
        eval_examples: 4,
        checkpoint_every: 0,
        ..PretrainConfig::default()
    };
    let b2 = base.clone();
    tokio::task::spawn_blocking(move || {
        encore_model::pretrain::pretrain(&pretrain, &b2, |_| {}).unwrap()
    })
    .await
    .unwrap();
    let (tuned, _) = encore_model::load_frozen(&base, &Device::Cpu).unwrap();
    let untuned = TrainablePolicy::fresh(&Preset::Tiny.config(), &Device::Cpu, 5)
        .unwrap()
        .frozen()
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(
            dir.path().join("store"),
            EmbeddedOptions::default(),
            Arc::new(SystemClock),
        )
        .unwrap(),
    );
    let service = Preferences::new(
        store.clone(),
        vec![
            HostedPolicy {
                name: "tuned".into(),
                policy: Arc::new(tuned),
                version: 1,
            },
            HostedPolicy {
                name: "untuned".into(),
                policy: Arc::new(untuned),
                version: 0,
            },
        ],
        Limits {
            clip_frames: FRAMES,
            pairs_per_minute: 1000,
            comparisons_per_minute: 1000,
            ..Limits::default()
        },
    );

    // The suggested prompts are corpus examples: the listeners know what
    // each one asked for.
    let examples = encore_corpus::eval_prompts(7, FRAMES, 64);
    let population = Population::new(3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut submitted = 0;
    // Forty listeners, each with its session.
    let sessions: Vec<String> = (0..40).map(|_| service.start_session().unwrap()).collect();
    for i in 0..PAIRS {
        let rater = sessions[i % 40].clone();
        let persona = population.persona((i % 40) as u64);
        // Which policy plays first alternates, so position says nothing.
        let (policy_a, policy_b) = if i % 2 == 0 {
            ("tuned", "untuned")
        } else {
            ("untuned", "tuned")
        };
        let pair = service
            .get_pair(GetPairRequest {
                prompt: String::new(),
                rater_id: rater.clone(),
                policy_a: policy_a.into(),
                policy_b: policy_b.into(),
            })
            .await
            .unwrap();
        let example = examples
            .iter()
            .find(|e| e.caption == pair.prompt)
            .expect("a suggested prompt");
        let (a, b) = (pair.a.unwrap(), pair.b.unwrap());
        let choice = match persona.prefer(
            &example.attributes,
            &example.mentioned,
            &a.tokens,
            &b.tokens,
            &mut rng,
        ) {
            RaterChoice::A => Choice::A,
            RaterChoice::B => Choice::B,
            RaterChoice::Tie => Choice::Neither,
            RaterChoice::Skip => continue,
        };
        service
            .submit(SubmitComparisonsRequest {
                comparisons: vec![Comparison {
                    client_key: format!("pair-{i}"),
                    rater_id: rater,
                    clip_a: a.clip_id,
                    clip_b: b.clip_id,
                    choice: choice as i32,
                    rating_a: 0,
                    rating_b: 0,
                }],
            })
            .await
            .unwrap();
        submitted += 1;
    }

    let collected = started.elapsed();
    let mut out = Vec::new();
    let exported = export(&*store, &Filter::default(), &mut out).await.unwrap();
    assert_eq!(exported.written, submitted);
    let records: Vec<PreferenceRecord> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tuned_won = records
        .iter()
        .filter(|r| {
            let tuned_first = r.a.policy_version.as_deref() == Some("tuned@1");
            matches!(
                (r.choice, tuned_first),
                (RaterChoice::A, true) | (RaterChoice::B, false)
            )
        })
        .count();
    let (_, report) = tokio::task::spawn_blocking(move || {
        train::train_preference(&records, &TrainConfig::small(), &Device::Cpu, &mut |_| {}).unwrap()
    })
    .await
    .unwrap();
    let Evaluation::Preference {
        accuracy, pairs, ..
    } = report.eval
    else {
        panic!("{:?}", report.eval)
    };
    println!(
        "{submitted} comparisons collected through the API (the pretrained policy preferred in {tuned_won}); \
         preference model held-out accuracy {accuracy:.3} on {pairs} pairs \
         (pretraining and collecting {collected:.1?}, all {:.1?})",
        started.elapsed()
    );
    assert!(pairs >= 40, "{pairs} held-out pairs");
    assert!(accuracy > 0.65, "held-out accuracy {accuracy}");
}

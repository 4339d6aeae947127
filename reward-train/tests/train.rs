//! Training end to end on small simulated datasets: each model must learn
//! something real (figures well past an untrained model's), and a trained
//! checkpoint must score the same after a save and a load.

use candle_core::Device;
use encore_raters::generate::{self, GenConfig};
use encore_reward::{RewardModel, ScoreInput};
use encore_reward_train::{self as train, Evaluation, TrainConfig};

fn small() -> TrainConfig {
    TrainConfig::small()
}

fn data(n: usize, seed: u64) -> GenConfig {
    GenConfig {
        seed,
        n,
        frames_min: 50,
        frames_max: 60,
        ..GenConfig::default()
    }
}

#[test]
fn quality_model_learns_to_rank_clips() {
    let records = generate::ratings(&data(400, 1)).unwrap();
    let (model, report) =
        train::train_quality(&records, &small(), &Device::Cpu, &mut |_| {}).unwrap();
    let Evaluation::Quality {
        spearman,
        ceiling_spearman,
        ..
    } = report.eval
    else {
        panic!("{:?}", report.eval)
    };
    // Untrained, the correlation is near 0; rater noise caps it near 0.95.
    assert!(spearman > 0.6, "held-out Spearman {spearman}");
    assert!(ceiling_spearman.unwrap() > spearman - 0.05);
    // Held-out figures on fresh data agree with the report's.
    let fresh = generate::ratings(&data(100, 2)).unwrap();
    let Evaluation::Quality {
        spearman: again, ..
    } = train::evaluate_quality(&model, &fresh).unwrap()
    else {
        unreachable!()
    };
    assert!(again > 0.5, "fresh-data Spearman {again}");
}

#[test]
fn preference_model_beats_chance_and_round_trips() {
    let records = generate::preferences(&data(700, 3)).unwrap();
    let (mut model, report) =
        train::train_preference(&records, &small(), &Device::Cpu, &mut |_| {}).unwrap();
    let Evaluation::Preference {
        accuracy,
        bayes_ceiling,
        pairs,
        ..
    } = report.eval
    else {
        panic!("{:?}", report.eval)
    };
    assert!(pairs > 50);
    assert!(accuracy > 0.6, "held-out accuracy {accuracy}");
    assert!(bayes_ceiling.unwrap() > 0.7);

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let loaded = RewardModel::load(dir.path(), &Device::Cpu).unwrap();
    let r = &records[0];
    let items = [
        ScoreInput::tokens(&r.caption, &r.a.tokens),
        ScoreInput::tokens(&r.caption, &r.b.tokens),
    ];
    assert_eq!(model.score(&items).unwrap(), loaded.score(&items).unwrap());
    assert!(loaded.config().description.contains("accuracy"));
}

#[test]
fn adherence_model_retrieves_far_above_chance() {
    let records = generate::clips(&data(600, 4)).unwrap();
    let cfg = TrainConfig {
        epochs: 6,
        ..small()
    };
    let (_, report) = train::train_adherence(&records, &cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let Evaluation::Adherence {
        recall_at_5,
        chance_at_5,
        oracle_at_5,
        ..
    } = report.eval
    else {
        panic!("{:?}", report.eval)
    };
    assert!(
        recall_at_5 > 4.0 * chance_at_5,
        "recall@5 {recall_at_5} vs chance {chance_at_5}"
    );
    assert!(oracle_at_5.unwrap() >= recall_at_5 - 0.05);
}

#[test]
fn too_little_data_is_a_clear_error() {
    let records = generate::ratings(&data(5, 5)).unwrap();
    let err = train::train_quality(&records, &small(), &Device::Cpu, &mut |_| {})
        .err()
        .unwrap();
    assert!(err.to_string().contains("too few"), "{err}");
}

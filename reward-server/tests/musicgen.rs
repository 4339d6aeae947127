//! Scoring a MusicGen policy's EnCodec codes: a random tiny MusicGen
//! checkpoint on disk, a reward server started with `audio_codec` pointing
//! at it (as `serve` loads it; `binary.rs` checks the `--audio-codec`
//! flag), items sent as codes (`codebooks` = 4) next to items of the
//! embedded codec's tokens, and the requests it must refuse.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::{MAX_TOKENS, TestServer, clips, request, test_config, tiny_model, violations};
use encore_musicgen::{Musicgen, tiny_config, write_random_checkpoint};
use encore_proto::v1::{DescribeModelsRequest, ScoreItem, ScoreRequest};
use encore_reward::{RewardKind, RewardModel, ScoreInput, resample};
use encore_reward_server::{Config, ServerBuilder, load_audio_codec};
use prometheus::Registry;
use tonic::Code;

/// Codes per codebook of the test checkpoint.
const CODEBOOK_SIZE: usize = 64;
/// Codebooks of `tiny_config` (at 50 frames/s, 8 kHz).
const K: usize = 4;

fn checkpoint(dir: &Path) {
    let words = ["calm", "piano", "fast", "drums"];
    write_random_checkpoint(dir, &tiny_config(CODEBOOK_SIZE, 32, 1, 16), &words, 3)
        .expect("a random MusicGen checkpoint");
}

/// `frames` frames of pseudo-random codes, row-major `[K][frames]`.
fn codes(seed: u32, frames: usize) -> Vec<u32> {
    (0..(K * frames) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % CODEBOOK_SIZE as u32)
        .collect()
}

fn coded(caption: &str, seed: u32, frames: usize) -> ScoreItem {
    ScoreItem {
        caption: caption.into(),
        tokens: codes(seed, frames),
        codebooks: K as u32,
    }
}

/// Scores of `items` by `model`, computed without the server: the full
/// MusicGen model's codec decodes each clip alone, rubato resamples it,
/// and the model hears the audio.
fn direct_scores(musicgen: &Musicgen, model: &RewardModel, items: &[ScoreItem]) -> Vec<f32> {
    let audio: Vec<Option<Vec<f32>>> = items
        .iter()
        .map(|item| {
            (item.codebooks > 1).then(|| {
                let frames = item.tokens.len() / K;
                let codes =
                    Tensor::from_vec(item.tokens.clone(), (1, K, frames), &Device::Cpu).unwrap();
                let wave: Vec<f32> = musicgen
                    .codec()
                    .decode(&codes)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                resample(&wave, musicgen.sample_rate(), encore_codec::SAMPLE_RATE).unwrap()
            })
        })
        .collect();
    let inputs: Vec<ScoreInput<'_>> = items
        .iter()
        .zip(&audio)
        .map(|(item, audio)| match audio {
            Some(samples) => ScoreInput::audio(&item.caption, samples),
            None => ScoreInput::tokens(&item.caption, &item.tokens),
        })
        .collect();
    model.score(&inputs).unwrap()
}

async fn start(config: Config, models: Vec<(&str, RewardModel)>) -> TestServer {
    // What `serve` does with the config, on a registry of the test's own.
    let mut builder = ServerBuilder::new(config.clone()).registry(Registry::new());
    if let Some(codec) = load_audio_codec(&config).await.unwrap() {
        builder = builder.audio_codec(codec);
    }
    for (name, model) in models {
        builder = builder.model(name, model);
    }
    TestServer::from_builder(builder).await
}

/// The violation a refused request names: its field and reason.
async fn refusal(t: &mut TestServer, request: ScoreRequest) -> (String, String) {
    let status = t.client.score(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields = violations(&status);
    assert_eq!(fields.len(), 1, "{fields:?}");
    let (field, reason) = fields.into_iter().next().expect("one violation");
    assert!(
        status.message().contains(&field),
        "{:?} does not name {field}",
        status.message()
    );
    (field, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encodec_codes_are_decoded_and_scored_next_to_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let musicgen_dir = dir.path().join("musicgen");
    checkpoint(&musicgen_dir);
    let config = Config {
        audio_codec: Some(musicgen_dir.clone()),
        ..test_config()
    };
    let models = [
        ("adherence", RewardKind::Adherence, 1),
        ("quality", RewardKind::Quality, 2),
    ];
    let mut t = start(
        config,
        models
            .iter()
            .map(|&(name, kind, seed)| (name, tiny_model(kind, seed)))
            .collect(),
    )
    .await;

    // The server says what codes it takes.
    let described = t
        .client
        .describe_models(DescribeModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let codec = described.audio_codec.expect("the audio codec is described");
    assert_eq!(codec.codec, "encodec");
    assert_eq!(codec.sample_rate_hz, 8000);
    assert_eq!(codec.codebooks as usize, K);
    assert_eq!(codec.codebook_size as usize, CODEBOOK_SIZE);
    assert_eq!(codec.frame_rate_hz, 50.0);
    assert_eq!(described.models.len(), 2);

    // Three clips of 2 s (100 frames, one EnCodec batch), one of 1.5 s,
    // and an item of the embedded codec's tokens, in one request.
    let mut items = vec![
        coded("calm piano", 1, 100),
        coded("calm piano", 2, 100),
        coded("fast drums", 3, 75),
        coded("fast drums", 4, 100),
    ];
    items.push(clips(50, 0, 1).remove(0));
    let response = t.scores(items.clone(), &[]).await;
    // Decoded once for both models.
    assert_eq!(t.registry_value("encore_reward_decoded_items_total"), 4.0);

    let musicgen = Musicgen::load(&musicgen_dir, &Device::Cpu).unwrap();
    for &(name, kind, seed) in &models {
        let served: Vec<f64> = response
            .results
            .iter()
            .map(|r| r.scores[name].value)
            .collect();
        assert!(served.iter().all(|s| s.is_finite()), "{name}: {served:?}");
        // Different clips, different scores.
        for i in 0..4 {
            for j in i + 1..4 {
                assert_ne!(served[i], served[j], "{name}: items {i} and {j}");
            }
        }
        let direct = direct_scores(&musicgen, &tiny_model(kind, seed), &items);
        for (i, (got, want)) in served.iter().zip(&direct).enumerate() {
            assert!(
                (got - f64::from(*want)).abs() < 1e-4,
                "{name} item {i}: served {got}, decoded alone {want}"
            );
        }
    }

    // The token item scores as it does on a server without a codec.
    let mut plain = start(
        test_config(),
        vec![("quality", tiny_model(RewardKind::Quality, 2))],
    )
    .await;
    let alone = plain.scores(vec![items[4].clone()], &[]).await;
    assert_eq!(
        alone.results[0].scores["quality"].value,
        response.results[4].scores["quality"].value
    );
    // That server has no codec: codes are refused, naming the field.
    let (field, reason) = refusal(&mut plain, request(vec![coded("x", 1, 100)], &[])).await;
    assert_eq!(
        (field.as_str(), reason.as_str()),
        ("items[0].codebooks", "INCOMPATIBLE")
    );
    plain.stop().await;

    // Bad codes, each refused naming its field.
    let mut out_of_range = coded("x", 1, 100);
    out_of_range.tokens[130] = CODEBOOK_SIZE as u32;
    let mut ragged = coded("x", 1, 100);
    ragged.tokens.pop();
    let min_frames = 2 * 4 - 1; // 7 frames: 3.5 -> 4 token frames, the minimum.
    let max_frames = 2 * MAX_TOKENS; // 400 frames: 200 token frames, the maximum.
    let cases = [
        (coded("x", 1, 100), 3, "items[0].codebooks", "INCOMPATIBLE"),
        (ragged, K as u32, "items[0].tokens", "INVALID_FIELD"),
        (
            out_of_range,
            K as u32,
            "items[0].tokens[130]",
            "TOKEN_OUT_OF_RANGE",
        ),
        (
            coded("x", 1, min_frames - 2),
            K as u32,
            "items[0].tokens",
            "INVALID_FIELD",
        ),
        (
            coded("x", 1, max_frames + 1),
            K as u32,
            "items[0].tokens",
            "TOO_LARGE",
        ),
    ];
    for (mut item, codebooks, field, reason) in cases {
        item.codebooks = codebooks;
        let got = refusal(&mut t, request(vec![item], &[])).await;
        assert_eq!(got, (field.to_owned(), reason.to_owned()));
    }
    // The limits' edges are accepted.
    let edges = vec![coded("x", 5, min_frames), coded("x", 6, max_frames)];
    t.scores(edges, &[]).await;

    // Several problems at once: all are named.
    let mut ragged = coded("x", 1, 100);
    ragged.tokens.pop();
    let mut wrong_k = coded("y", 1, 100);
    wrong_k.codebooks = 2;
    let status = t
        .client
        .score(request(vec![ragged, wrong_k], &[]))
        .await
        .unwrap_err();
    let fields = violations(&status);
    assert_eq!(fields.len(), 2, "{fields:?}");
    assert_eq!(fields["items[0].tokens"], "INVALID_FIELD");
    assert_eq!(fields["items[1].codebooks"], "INCOMPATIBLE");
    t.stop().await;
}

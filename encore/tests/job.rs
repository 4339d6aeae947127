//! `encore job` (the binary) against a coordinator started separately on a
//! real Redis: submit a spec file, list, get (text and proto3 JSON), watch
//! while another invocation cancels, and the errors a user meets (a bad
//! token, a misspelt field, a spec the coordinator refuses).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use encore_coordinator::config::{AuthConfig, TlsConfig};
use encore_coordinator::{Config, Coordinator, RunningCoordinator};
use encore_testkit::RedisServer;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "cli-test-token";

async fn encore(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_encore"))
        .args(["job", "--coordinator", url])
        .args(args)
        .env("ENCORE_TOKEN", TOKEN)
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .expect("encore runs")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "encore failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of_failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A coordinator on `store` (TLS with `tls`) taking the test's client
/// token, until `stop`.
async fn coordinator(
    store: String,
    dir: &Path,
    tls: Option<TlsConfig>,
    stop: &CancellationToken,
) -> RunningCoordinator {
    Coordinator::new(Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        store,
        blob_dir: dir.join("blobs"),
        checkpoint_dir: dir.join("checkpoints"),
        shutdown_grace_ms: 500,
        tls,
        auth: AuthConfig {
            client_tokens: vec![format!("alice:{TOKEN}")],
            worker_token: Some("worker".into()),
            ..AuthConfig::default()
        },
        ..Config::default()
    })
    .start(stop.clone())
    .await
    .unwrap()
}

#[tokio::test]
async fn the_job_cli_drives_a_coordinator_on_redis() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let coordinator = coordinator(redis.url(), dir.path(), None, &stop).await;
    let url = format!("http://{}", coordinator.grpc_addr());
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ru-tiny.toml");

    // The shipped examples are valid specs.
    let out = stdout(&encore(&url, &["submit", example, "--validate-only"]).await);
    assert!(out.contains("valid"), "{out}");
    let musicgen = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/musicgen-small.toml"
    );
    let out = stdout(&encore(&url, &["submit", musicgen, "--validate-only"]).await);
    assert!(out.contains("valid"), "{out}");

    // Submit: the job id on stdout, PENDING (no workers joined).
    let job_id = stdout(&encore(&url, &["submit", example]).await)
        .trim()
        .to_owned();
    assert!(job_id.starts_with("job-"), "{job_id}");
    let listed = stdout(&encore(&url, &["list", "--state", "pending"]).await);
    assert!(
        listed.contains(&job_id)
            && listed.contains("PENDING")
            && listed.contains("RU on the tiny preset"),
        "{listed}"
    );
    let none = stdout(&encore(&url, &["list", "--state", "running"]).await);
    assert!(!none.contains(&job_id), "{none}");
    let shown = stdout(&encore(&url, &["get", &job_id]).await);
    assert!(shown.contains("stages: R -> U"), "{shown}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&encore(&url, &["get", &job_id, "--json"]).await)).unwrap();
    assert_eq!(json["state"], "JOB_STATE_PENDING");
    assert_eq!(json["spec"]["stages"][1]["name"], "U");

    // Watch in one process, cancel from another: the watch ends with the
    // cancellation and a failing exit status.
    let watch = {
        let (url, job_id) = (url.clone(), job_id.clone());
        tokio::spawn(async move { encore(&url, &["watch", &job_id]).await })
    };
    let cancelled = stdout(&encore(&url, &["cancel", &job_id, "--reason", "testing"]).await);
    assert!(cancelled.contains("CANCELLED"), "{cancelled}");
    let watched = watch.await.unwrap();
    let log = String::from_utf8_lossy(&watched.stdout).into_owned();
    assert!(
        log.contains("PENDING") && log.contains("state CANCELLED"),
        "{log}"
    );
    let why = stderr_of_failure(&watched);
    assert!(why.contains("CANCELLED"), "{why}");

    // Errors say what is wrong.
    let bad_token = tokio::process::Command::new(env!("CARGO_BIN_EXE_encore"))
        .args(["job", "--coordinator", &url, "--token", "wrong", "list"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .unwrap();
    assert!(stderr_of_failure(&bad_token).contains("UNAUTHENTICATED"));
    let misspelt = dir.path().join("misspelt.toml");
    std::fs::write(&misspelt, "name = \"x\"\nstagez = []\n").unwrap();
    let err = stderr_of_failure(&encore(&url, &["submit", misspelt.to_str().unwrap()]).await);
    assert!(err.contains("stagez"), "{err}");
    let refused = dir.path().join("refused.json");
    std::fs::write(
        &refused,
        r#"{"name": "no base", "algorithm": {"samplesPerPrompt": 1}}"#,
    )
    .unwrap();
    let err = stderr_of_failure(&encore(&url, &["submit", refused.to_str().unwrap()]).await);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("spec.algorithm.samples_per_prompt"),
        "{err}"
    );

    stop.cancel();
    coordinator.wait().await.unwrap();
}

/// `--tls-ca` lets the CLI reach a coordinator that speaks TLS; without it,
/// an https:// coordinator is refused before any connection, naming the flag.
#[tokio::test]
async fn the_job_cli_reaches_a_tls_coordinator_through_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
    let stop = CancellationToken::new();
    let store = format!("embedded://{}", dir.path().join("state").display());
    let tls = TlsConfig {
        cert: cert.clone(),
        key: key_file,
    };
    let coordinator = coordinator(store, dir.path(), Some(tls), &stop).await;
    let url = format!("https://localhost:{}", coordinator.grpc_addr().port());

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ru-tiny.toml");
    let ca = cert.to_str().unwrap();
    let out = stdout(
        &encore(
            &url,
            &["submit", example, "--validate-only", "--tls-ca", ca],
        )
        .await,
    );
    assert!(out.contains("valid"), "{out}");
    let err = stderr_of_failure(&encore(&url, &["list"]).await);
    assert!(err.contains("--tls-ca: required"), "{err}");

    stop.cancel();
    coordinator.wait().await.unwrap();
}

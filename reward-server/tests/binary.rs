//! The `encore-reward-server` binary as an operator runs it: flags, a
//! checkpoint on disk, a clean exit on SIGTERM, and configuration errors
//! (a bad value, an audio codec that does not load) that name the key.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::{PATIENCE, clips, request, tiny_model};
use encore_proto::v1::reward_service_client::RewardServiceClient;
use encore_reward::RewardKind;

const BINARY: &str = env!("CARGO_BIN_EXE_encore-reward-server");

fn command() -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_remove("ENCORE_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Reads the JSON log lines on the child's stderr until the server says it
/// is ready, and returns its gRPC address. The rest of stderr is drained in
/// the background so the child never blocks on a full pipe.
fn wait_ready(child: &mut Child) -> SocketAddr {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &record["fields"];
        if fields["message"] == "reward server ready" {
            let addr = fields["grpc_addr"].as_str().unwrap().parse().unwrap();
            std::thread::spawn(move || lines.for_each(drop));
            return addr;
        }
    }
    panic!("the server exited before it was ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_checkpoint_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quality");
    tiny_model(RewardKind::Quality, 9).save(&path).unwrap();

    let mut child = command()
        .arg("--model")
        .arg(format!("quality={}", path.display()))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--log-format", "json", "--max-wait-ms", "1"])
        .spawn()
        .unwrap();
    let addr = wait_ready(&mut child);

    let mut client = RewardServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let response = client
        .score(request(clips(40, 0, 2), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 2);
    assert_eq!(response.model_sha256["quality"].len(), 64);

    // SAFETY: `kill` on a child we started and have not reaped.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let pid = child.id();
    let exited = tokio::time::timeout(
        PATIENCE,
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await;
    let Ok(status) = exited else {
        // SAFETY: as above; the child has not been reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        panic!("the server did not exit after SIGTERM");
    };
    let status = status.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_bad_setting_fails_at_start_naming_the_key() {
    let output = command()
        .args(["--model", "quality=/nonexistent", "--max-batch-items", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reward_server.max_batch_items"), "{stderr}");

    let output = command()
        .args(["--model", "quality=/nonexistent/checkpoint"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/checkpoint"), "{stderr}");
}

#[test]
fn an_audio_codec_that_does_not_load_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let quality = dir.path().join("quality");
    tiny_model(RewardKind::Quality, 1).save(&quality).unwrap();
    let output = command()
        .arg("--model")
        .arg(format!("quality={}", quality.display()))
        .arg("--audio-codec")
        .arg(dir.path().join("no-such-musicgen"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reward_server.audio_codec"), "{stderr}");
    assert!(stderr.contains("no-such-musicgen"), "{stderr}");
}

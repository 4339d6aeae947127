//! A real SIGTERM cancels the token from `shutdown_token`. Its own test
//! binary, so that no other test's signal reaches this process: a second
//! signal would make `shutdown_token` exit the process.

use std::time::Duration;

use encore_telemetry::shutdown_token;

#[tokio::test]
async fn sigterm_cancels_the_token() {
    let token = shutdown_token().unwrap();
    assert!(!token.is_cancelled());
    // SAFETY: kill(2) on our own pid; `shutdown_token` installed the handler.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    assert_eq!(rc, 0, "kill failed");
    tokio::time::timeout(Duration::from_secs(10), token.cancelled())
        .await
        .expect("SIGTERM did not cancel the token");
}

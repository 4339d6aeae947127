//! Real SIGTERM and SIGINT sent to this test process. Safe here because the
//! handlers are installed before each signal is sent (so neither kills the
//! process), and because this file is its own test binary: no other test
//! shares the process and sees these signals.

use encore_telemetry::{ShutdownSignal, Signals};

fn send(signal: libc::c_int) {
    // SAFETY: kill(2) on our own pid with a signal whose handler is installed.
    let rc = unsafe { libc::kill(libc::getpid(), signal) };
    assert_eq!(rc, 0, "kill failed");
}

#[tokio::test]
async fn signals_are_received_and_told_apart() {
    let mut signals = Signals::install().unwrap();
    send(libc::SIGTERM);
    assert_eq!(signals.recv().await, ShutdownSignal::Terminate);
    send(libc::SIGINT);
    assert_eq!(signals.recv().await, ShutdownSignal::Interrupt);
}

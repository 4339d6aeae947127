//! TLS by configuration: with `coordinator.tls` set, the gRPC port speaks
//! TLS with the configured certificate, a client that trusts it works, and
//! a plaintext client does not get through. Workers reach it with
//! `tls.ca` (learner/tests/rl_loop.rs runs a whole job that way).

mod support;

use encore_client::CoordinatorTls;
use encore_client::member::CoordinatorClient;
use encore_coordinator::config::TlsConfig;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{ListJobsRequest, Role};
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[tokio::test]
async fn the_grpc_port_speaks_tls_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = key.cert.pem();
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let store = format!("embedded://{}", dir.path().join("state").display());
    let mut config = test_config(&store, dir.path());
    config.tls = Some(TlsConfig {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    });
    let c = TestCoordinator::start(config).await;
    let port = c.running.grpc_addr().port();

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS client that trusts the certificate connects");
    let mut jobs = JobServiceClient::with_interceptor(channel, bearer(ALICE));
    jobs.list(ListJobsRequest::default()).await.unwrap();

    // Plaintext HTTP/2 to a TLS port fails (at connect or at the first call).
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut jobs = JobServiceClient::with_interceptor(channel, bearer(ALICE));
        assert!(jobs.list(ListJobsRequest::default()).await.is_err());
    }
    c.stop().await;
}

/// A TLS coordinator serving a self-signed certificate for "localhost",
/// written to `dir/cert.pem` (which is then also its CA).
async fn tls_coordinator(dir: &std::path::Path) -> TestCoordinator {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let store = format!("embedded://{}", dir.join("state").display());
    let mut config = test_config(&store, dir);
    config.tls = Some(TlsConfig {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    });
    TestCoordinator::start(config).await
}

#[tokio::test]
async fn a_worker_reaches_a_tls_coordinator_through_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let c = tls_coordinator(dir.path()).await;
    let url = format!("https://localhost:{}", c.running.grpc_addr().port());
    let ca = |path: std::path::PathBuf| CoordinatorTls { ca: path };

    // With the CA, the worker's client registers.
    let trusted = ca(dir.path().join("cert.pem"));
    let client = CoordinatorClient::new(&url, WORKER, Some(&trusted)).unwrap();
    let registered = client
        .cluster()
        .register(register(Role::Actor, "tls-actor"))
        .await
        .expect("a worker that trusts the CA registers")
        .into_inner();
    assert!(!registered.member_id.is_empty());

    // Without one, an https:// coordinator is refused up front, naming the
    // setting; with another CA, the handshake fails.
    let err = CoordinatorClient::new(&url, WORKER, None).unwrap_err();
    assert!(err.starts_with("tls.ca: required"), "{err}");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("other.pem"), other.cert.pem()).unwrap();
    let stranger =
        CoordinatorClient::new(&url, WORKER, Some(&ca(dir.path().join("other.pem")))).unwrap();
    let refused = stranger
        .cluster()
        .register(register(Role::Actor, "tls-stranger"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // A CA for a plaintext URL is a mistake too.
    let plain = format!("http://127.0.0.1:{}", c.running.grpc_addr().port());
    let err = CoordinatorClient::new(&plain, WORKER, Some(&trusted)).unwrap_err();
    assert!(err.starts_with("tls: set"), "{err}");
    c.stop().await;
}

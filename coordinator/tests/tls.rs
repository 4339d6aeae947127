//! TLS by configuration: with `coordinator.tls` set, the gRPC port speaks
//! TLS with the configured certificate, a client that trusts it works, and
//! a plaintext client does not get through.

mod support;

use encore_coordinator::config::TlsConfig;
use encore_proto::v1::ListJobsRequest;
use encore_proto::v1::job_service_client::JobServiceClient;
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

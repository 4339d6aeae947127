//! The admin server, started for real on 127.0.0.1:0 and spoken to over
//! HTTP/1.1.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use encore_telemetry::metrics::{Label, Subsystem};
use encore_telemetry::{AdminState, Error, Readiness, serve_admin};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bounds every wait on the server, so that a broken shutdown fails the test
/// instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

struct Reply {
    status: StatusCode,
    content_type: Option<String>,
    body: String,
}

/// One HTTP/1.1 connection to the server, kept open between requests.
struct Client {
    addr: SocketAddr,
    sender: SendRequest<Empty<&'static [u8]>>,
    connection: JoinHandle<hyper::Result<()>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        Self {
            addr,
            sender,
            connection: tokio::spawn(connection),
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let request = Request::get(path)
            .header(header::HOST, self.addr.to_string())
            .body(Empty::new())
            .unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            content_type,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }
}

/// One request on a fresh connection.
async fn get(addr: SocketAddr, path: &str) -> Reply {
    Client::connect(addr).await.get(path).await
}

struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    readiness: Readiness,
}

async fn start(registry: Registry) -> Server {
    let readiness = Readiness::new();
    let shutdown = CancellationToken::new();
    let (addr, task) = serve_admin(
        "127.0.0.1:0".parse().unwrap(),
        AdminState::new(registry, readiness.clone()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert_ne!(addr.port(), 0, "the bound port is reported");
    Server {
        addr,
        task,
        shutdown,
        readiness,
    }
}

/// Checks `text` line by line against the text exposition format 0.0.4:
/// `# HELP name text`, `# TYPE name kind`, and samples
/// `name{label="value",...} number`, each sample's family declared by a
/// `# TYPE` line before it. Returns the declared families.
fn parse_exposition(text: &str) -> HashSet<String> {
    let mut families = HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let keyword = words.next().unwrap();
            let name = words
                .next()
                .unwrap_or_else(|| panic!("bare comment: {line}"));
            let rest = words.next().unwrap_or_default();
            match keyword {
                "HELP" => {}
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest),
                        "unknown type: {line}"
                    );
                    families.insert(name.to_owned());
                }
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let close = rest
                .find('}')
                .unwrap_or_else(|| panic!("unclosed labels: {line}"));
            for pair in rest[1..close].split(',') {
                let (label, value) = pair.split_once('=').unwrap();
                assert!(!label.is_empty(), "empty label name: {line}");
                assert!(
                    value.len() >= 2 && value.starts_with('"') && value.ends_with('"'),
                    "unquoted label value: {line}"
                );
            }
            rest = &rest[close + 1..];
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value is not a number: {line}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| families.contains(*f)))
            .unwrap_or(name);
        assert!(families.contains(family), "sample without # TYPE: {line}");
    }
    families
}

#[tokio::test]
async fn metrics_exposes_registered_metrics() {
    let registry = Registry::new();
    let m = Subsystem::new(&registry, "test").unwrap();
    let requests = m
        .counter_vec("requests_total", "Requests served.", &[Label::Role])
        .unwrap();
    let latency = m
        .latency_histogram_vec("rpc_seconds", "Rpc latency.", &[Label::Stage])
        .unwrap();
    requests.with_label_values(&["actor"]).inc_by(2);
    latency.with_label_values(&["rollout"]).observe(0.02);
    let server = start(registry).await;

    let reply = get(server.addr, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        reply.content_type
    );
    let families = parse_exposition(&reply.body);
    assert!(
        families.contains("encore_test_requests_total"),
        "{}",
        reply.body
    );
    assert!(
        families.contains("encore_test_rpc_seconds"),
        "{}",
        reply.body
    );
    assert!(
        reply
            .body
            .contains("# HELP encore_test_requests_total Requests served.\n")
    );
    assert!(
        reply
            .body
            .contains("# TYPE encore_test_requests_total counter\n")
    );
    assert!(
        reply
            .body
            .contains("encore_test_requests_total{role=\"actor\"} 2\n")
    );
    assert!(
        reply
            .body
            .contains("# TYPE encore_test_rpc_seconds histogram\n")
    );
    assert!(
        reply
            .body
            .contains("encore_test_rpc_seconds_count{stage=\"rollout\"} 1\n")
    );

    // The scrape reads the live registry, not a copy taken at start-up.
    requests.with_label_values(&["actor"]).inc();
    let reply = get(server.addr, "/metrics").await;
    assert!(
        reply
            .body
            .contains("encore_test_requests_total{role=\"actor\"} 3\n"),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn healthz_answers_ok() {
    let server = start(Registry::new()).await;
    let reply = get(server.addr, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.trim(), "ok");
    // Liveness does not depend on readiness.
    assert!(!server.readiness.is_ready());
}

#[tokio::test]
async fn readyz_follows_readiness() {
    let server = start(Registry::new()).await;
    let mut client = Client::connect(server.addr).await;

    let reply = client.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.body.contains("starting"), "{}", reply.body);

    server.readiness.set_ready();
    let reply = client.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::OK);

    server.readiness.set_not_ready("learner unreachable");
    let reply = client.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.body.contains("learner unreachable"), "{}", reply.body);
}

#[tokio::test]
async fn cancelling_the_token_stops_the_server() {
    let server = start(Registry::new()).await;
    // An idle keep-alive connection must not hold the shutdown up.
    let mut client = Client::connect(server.addr).await;
    assert_eq!(client.get("/healthz").await.status, StatusCode::OK);

    server.shutdown.cancel();
    tokio::time::timeout(PATIENCE, server.task)
        .await
        .expect("the server did not stop")
        .unwrap();
    // The server closed the idle connection and no longer listens.
    tokio::time::timeout(PATIENCE, client.connection)
        .await
        .expect("the idle connection was left open")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn a_taken_port_is_a_bind_error() {
    let server = start(Registry::new()).await;
    let err = serve_admin(
        server.addr,
        AdminState::new(Registry::new(), Readiness::new()),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Bind { addr, .. } if addr == server.addr),
        "{err}"
    );
}

//! Test support shared by Encore's integration tests: a real `redis-server`
//! on a free loopback port ([`RedisServer`], started per test and killed on
//! drop) and [`free_port`]. Dev-dependency only; never in a shipped binary.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long a redis-server may take to answer PING after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `redis-server` child process on a free loopback port, without
/// persistence, killed when dropped.
pub struct RedisServer {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING. Panics, with the
    /// install command, if `redis-server` is not on PATH: the Redis half of
    /// the suite must fail, not pass silently, on a machine without it.
    pub async fn start() -> Self {
        let binary = find_on_path("redis-server").unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH; the Redis backend's tests need a real server: \
                 install it with `apt-get install -y redis-server`"
            )
        });
        let mut last_error = String::new();
        // A port found free can be taken by someone else before the server
        // binds it; then the server exits and we try another.
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir for redis-server");
            let mut child = Command::new(&binary)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawning redis-server");
            match wait_ready(&mut child, port).await {
                Ok(()) => {
                    return Self {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                Err(err) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = err;
                }
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends one command in RESP and returns the raw reply text.
    pub async fn command(&self, args: &[&str]) -> String {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .await
            .expect("connecting to redis-server");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut reply = Vec::new();
        let mut buf = [0u8; 65536];
        // Replies used here are small; read until the server pauses.
        loop {
            let n = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
            match n {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("reading from redis-server: {e}"),
            }
            if reply.ends_with(b"\r\n") && !reply.is_empty() {
                break;
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first file called `name` in a directory of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a free port");
    listener.local_addr().expect("local addr").port()
}

/// Polls PING with a growing back-off until the server answers, it exits,
/// or READY_TIMEOUT passes.
async fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut backoff = Duration::from_millis(2);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server on port {port} exited with {status}"));
        }
        if ping(port).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("no PONG on port {port} within {READY_TIMEOUT:?}"));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

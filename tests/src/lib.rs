//! Support for Encore's cross-process tests: a local cluster whose
//! coordinator, reward server, actors and learner rank are each an
//! `encore serve ROLE` process on one generated configuration file (the
//! way `encore quickstart` and a deployment run them), on the embedded
//! store or on Redis, with tiny untrained models. A test can SIGKILL any
//! process and start it again on the same configuration.
//!
//! The processes run the test's own executable: a test binary built on
//! this crate is the `encore` command when its first argument is `serve`
//! (see [`serve_if_asked`]), so the processes run the code under test
//! without depending on another package's binary having been built.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use candle_core::Device;
use clap::Parser;
use encore::local_cluster::{ClusterConfig, stop, tail, token};
use encore_client::BearerToken;
use encore_coordinator::config::AuthConfig;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_reward_server::ModelSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A JobService client with the cluster's client token.
pub type Jobs = JobServiceClient<InterceptedService<Channel, BearerToken>>;

/// The name of the reward model the cluster's reward server hosts.
pub const REWARD_MODEL: &str = "quality";
/// How long a process may take to answer after it was started.
const READY: Duration = Duration::from_secs(60);
/// How long a process may take to exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(30);

/// Runs the `encore` command and returns its exit code if this process was
/// started as `<exe> serve ROLE ...`, as [`Cluster`] starts its processes;
/// `None` otherwise. A test binary's `main` calls it first.
pub fn serve_if_asked() -> Option<ExitCode> {
    if std::env::args().nth(1).as_deref() != Some("serve") {
        return None;
    }
    let cli = encore::Cli::parse();
    encore_telemetry::init(cli.log_format, "info");
    Some(match encore::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    })
}

/// What the cluster runs on.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The coordinator's store: `embedded://DIR` or a Redis URL.
    pub store: String,
    /// Actor processes.
    pub actors: usize,
    /// The coordinator's lease: how long a killed worker keeps its work
    /// before the coordinator hands it on.
    pub lease_ttl: Duration,
}

/// One process of the cluster.
struct Process {
    /// Its name: `coordinator`, `reward-server`, `actor-N`, `learner`.
    name: String,
    /// What it runs (`encore serve ROLE`).
    role: &'static str,
    /// Its own environment on top of the shared configuration file.
    env: Vec<(String, String)>,
    /// Its admin server (`/metrics`, `/readyz`), on a port of its own that
    /// it keeps across restarts.
    admin: SocketAddr,
    /// Its stderr, across restarts.
    log: PathBuf,
    child: Option<Child>,
}

/// A running local cluster.
pub struct Cluster {
    dir: PathBuf,
    program: PathBuf,
    config_file: PathBuf,
    url: String,
    client_token: String,
    processes: Vec<Process>,
    /// The tiny base policy jobs start from.
    pub base: PathBuf,
}

/// A loopback port that was free a moment ago (the process binds it).
fn port() -> u16 {
    encore_testkit::free_port()
}

/// Writes an untrained tiny base policy into `dir/base` and an untrained
/// tiny quality model into `dir/quality`: the drill is about the plumbing,
/// so the rewards need not mean anything, only be real model outputs.
fn tiny_models(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (base, quality_dir) = (dir.join("base"), dir.join(REWARD_MODEL));
    encore_model::TrainablePolicy::fresh(&encore_model::Preset::Tiny.config(), &Device::Cpu, 1)?
        .save(&base, serde_json::json!({}))?;
    let mut quality = encore_reward::RewardConfig::new(encore_reward::RewardKind::Quality);
    quality.arch = encore_reward::ArchConfig::tiny();
    quality.min_tokens = 4;
    quality.max_tokens = 200;
    encore_reward::RewardModel::fresh(quality, &Device::Cpu, 3)?.save(&quality_dir)?;
    Ok((base, quality_dir))
}

impl Cluster {
    /// Writes the models and the configuration under `dir` and starts the
    /// processes as `program serve ROLE`; returns once the coordinator
    /// answers.
    pub async fn start(dir: &Path, program: &Path, setup: &Setup) -> anyhow::Result<Cluster> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let (base, quality) = tiny_models(dir)?;
        // Fixed ports for the processes others call, so that a restarted
        // one is found where it was.
        let coordinator_port = port();
        let url = format!("http://127.0.0.1:{coordinator_port}");
        let (client_token, worker_token) = (token("client"), token("worker"));
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let config = ClusterConfig {
            coordinator: encore_coordinator::Config {
                listen: SocketAddr::from(([127, 0, 0, 1], coordinator_port)),
                admin: any_port,
                store: setup.store.clone(),
                blob_dir: dir.join("blobs"),
                checkpoint_dir: dir.join("checkpoints"),
                lease_ttl_ms: setup.lease_ttl.as_millis() as u64,
                shutdown_grace_ms: 2000,
                auth: AuthConfig {
                    client_tokens: vec![format!("drill:{client_token}")],
                    worker_token: Some(worker_token.clone()),
                    ..AuthConfig::default()
                },
                ..encore_coordinator::Config::default()
            },
            reward_server: encore_reward_server::Config {
                listen: SocketAddr::from(([127, 0, 0, 1], port())),
                admin: any_port,
                coordinator: url.clone(),
                worker_token: Some(worker_token.clone()),
                shutdown_grace_ms: 2000,
                models: vec![ModelSpec {
                    name: REWARD_MODEL.to_owned(),
                    path: quality,
                }],
                ..encore_reward_server::Config::default()
            },
            actor: encore_actor::Config {
                coordinator: url.clone(),
                worker_token: Some(worker_token.clone()),
                admin: any_port,
                // Back on their feet soon after a restarted process answers.
                max_backoff_ms: 200,
                ..encore_actor::Config::default()
            },
            learner: encore_learner::Config {
                coordinator: url.clone(),
                worker_token: Some(worker_token),
                admin: any_port,
                work_dir: dir.join("learner"),
                keep_checkpoints: 1000,
                ..encore_learner::Config::default()
            },
        };
        let config_file = dir.join("encore.toml");
        std::fs::write(&config_file, toml::to_string_pretty(&config)?)?;

        let process = |name: &str, role: &'static str, mut env: Vec<(String, String)>| {
            let admin = SocketAddr::from(([127, 0, 0, 1], port()));
            let section = role.replace('-', "_").to_uppercase();
            env.push((format!("ENCORE_{section}__ADMIN"), admin.to_string()));
            Process {
                name: name.to_owned(),
                role,
                env,
                admin,
                log: logs.join(format!("{name}.log")),
                child: None,
            }
        };
        let mut processes = vec![
            process("coordinator", "coordinator", Vec::new()),
            process("reward-server", "reward-server", Vec::new()),
        ];
        for i in 0..setup.actors {
            let work_dir = dir.join(format!("actor-{i}")).display().to_string();
            processes.push(process(
                &format!("actor-{i}"),
                "actor",
                vec![("ENCORE_ACTOR__WORK_DIR".into(), work_dir)],
            ));
        }
        processes.push(process("learner", "learner", Vec::new()));
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            program: program.to_owned(),
            config_file,
            url,
            client_token,
            processes,
            base,
        };
        let names: Vec<String> = cluster.processes.iter().map(|p| p.name.clone()).collect();
        for name in &names {
            cluster.spawn(name)?;
        }
        cluster.jobs().await?;
        Ok(cluster)
    }

    fn process(&mut self, name: &str) -> anyhow::Result<&mut Process> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("the cluster has no process {name}"))
    }

    /// Starts `name` on the cluster's configuration; its log goes on.
    fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
        let (program, config_file) = (self.program.clone(), self.config_file.clone());
        let process = self.process(name)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&process.log)
            .with_context(|| format!("opening {}", process.log.display()))?;
        let child = Command::new(program)
            .args(["serve", process.role])
            .env("ENCORE_CONFIG", config_file)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(process.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        process.child = Some(child);
        Ok(())
    }

    /// SIGKILL for `name` (no drain, no clean-up: what it had not written
    /// to the store or a checkpoint is gone), then, `down` later, the same
    /// process again: the others meet a process that is away for a while,
    /// as a real restart is, not one that merely bounced.
    pub async fn kill_and_restart(&mut self, name: &str, down: Duration) -> anyhow::Result<()> {
        let process = self.process(name)?;
        let mut child = process
            .child
            .take()
            .ok_or_else(|| anyhow!("{name} is not running"))?;
        // tokio's `kill` is SIGKILL, and reaps the child.
        child
            .kill()
            .await
            .with_context(|| format!("SIGKILL for {name}"))?;
        tokio::time::sleep(down).await;
        self.spawn(name)?;
        if name == "coordinator" {
            self.jobs().await?;
        }
        Ok(())
    }

    /// A JobService client, once the coordinator answers (at most a
    /// minute; fails early if the coordinator exited).
    pub async fn jobs(&mut self) -> anyhow::Result<Jobs> {
        let deadline = Instant::now() + READY;
        let endpoint = Channel::from_shared(self.url.clone())?;
        let mut delay = Duration::from_millis(10);
        loop {
            self.check_alive()?;
            match endpoint.connect().await {
                Ok(channel) => {
                    let token = BearerToken::new(&self.client_token).map_err(|e| anyhow!(e))?;
                    return Ok(JobServiceClient::with_interceptor(channel, token));
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(anyhow!(e).context(format!(
                        "the coordinator at {} did not answer; {}",
                        self.url,
                        self.logs()
                    )));
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    /// The sum of the samples of `metric` on `name`'s `/metrics` (0 when it
    /// has none yet).
    pub async fn metric(&mut self, name: &str, metric: &str) -> anyhow::Result<f64> {
        let admin = self.process(name)?.admin;
        let mut stream = tokio::net::TcpStream::connect(admin)
            .await
            .with_context(|| format!("{name}'s admin server at {admin}"))?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        let (head, body) = reply
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("{name}'s /metrics answered {reply:?}"))?;
        ensure!(
            head.contains(" 200 "),
            "{name}'s /metrics answered {head:?}"
        );
        let mut sum = 0.0;
        for line in body.lines() {
            // `name{labels} value` or `name value`.
            let Some(rest) = line.strip_prefix(metric) else {
                continue;
            };
            if rest.starts_with('{') || rest.starts_with(' ') {
                let value = rest.rsplit(' ').next().unwrap_or_default();
                sum += value
                    .parse::<f64>()
                    .with_context(|| format!("{name}'s /metrics line {line:?}"))?;
            }
        }
        Ok(sum)
    }

    /// Fails, naming the process and the end of its log, if one exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.processes {
            if let Some(child) = &mut p.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited ({status}); the end of its log {}:\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 30)
                );
            }
        }
        Ok(())
    }

    /// Where the processes' logs are.
    pub fn logs(&self) -> String {
        format!("logs in {}", self.dir.join("logs").display())
    }

    /// The end of every process's log, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        self.processes
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name, tail(&p.log, lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM for every process, the workers first and the coordinator
    /// last (they leave it), each awaited; fails unless every one exited
    /// cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for p in self.processes.iter_mut().rev() {
            let Some(mut child) = p.child.take() else {
                continue;
            };
            if let Err(why) = stop(&mut child, EXIT).await {
                failed.push(format!("{} ({why})", p.name));
            }
        }
        if !failed.is_empty() {
            bail!(
                "not every process stopped cleanly: {}; {}",
                failed.join(", "),
                self.logs()
            );
        }
        Ok(())
    }
}

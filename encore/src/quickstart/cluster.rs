//! The quick start's local cluster: a coordinator on the embedded store, a
//! reward server hosting the three reward models, actors and a learner
//! rank, each an `encore serve ROLE` child process of this one, talking
//! gRPC on loopback. Jobs go in through JobService as any client's would.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use encore_client::BearerToken;
use encore_coordinator::config::AuthConfig;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    Algorithm, AlgorithmKind, JobResources, JobSpec, JobState, MetricPoint, ModelRef,
    Normalization, NormalizationKind, Prompt, PromptList, PromptSource, RewardConfig,
    SamplingParams, Stage, StopCondition, SubmitJobRequest, WatchJobRequest, job_event,
    prompt_source,
};
use encore_reward_server::ModelSpec;
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Plan;
use crate::local_cluster::{ClusterConfig, stop, tail, token};

/// The client token the quick start submits jobs with.
const CLIENT: &str = "quickstart";
/// A job that reports no step for this long has stalled.
const STALL: Duration = Duration::from_secs(300);

type Jobs = JobServiceClient<InterceptedService<Channel, BearerToken>>;

/// One child process.
struct Process {
    name: String,
    log: PathBuf,
    child: Child,
}

/// The running cluster.
pub(super) struct Cluster {
    dir: PathBuf,
    processes: Vec<Process>,
    jobs: Jobs,
    plan: Plan,
}

/// A job that ran to its end.
pub(super) struct JobRun {
    /// Its name in the report ("RU", "U").
    pub name: String,
    /// The coordinator's job id.
    pub job_id: String,
    /// Every step's metric point, in order.
    pub points: Vec<MetricPoint>,
    /// Each stage's name and last step.
    pub stage_ends: Vec<(String, u64)>,
    /// The learner checkpoints of this job (`step-N/` under it).
    pub checkpoints: PathBuf,
}

/// A free loopback port (released again: the child binds it).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?
        .local_addr()?
        .port())
}

impl Cluster {
    /// Writes the cluster's configuration under `dir` and starts the
    /// processes; returns once the coordinator answers.
    pub async fn start(dir: &Path, rewards: &Path, plan: &Plan) -> anyhow::Result<Cluster> {
        let _ = std::fs::remove_dir_all(dir);
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let (client_token, worker_token) = (token("client"), token("worker"));
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let config = ClusterConfig {
            coordinator: encore_coordinator::Config {
                listen: SocketAddr::from(([127, 0, 0, 1], port)),
                admin: loopback,
                store: format!("embedded://{}", dir.join("state").display()),
                blob_dir: dir.join("blobs"),
                checkpoint_dir: dir.join("checkpoints"),
                shutdown_grace_ms: 2000,
                auth: AuthConfig {
                    client_tokens: vec![format!("{CLIENT}:{client_token}")],
                    worker_token: Some(worker_token.clone()),
                    ..AuthConfig::default()
                },
                ..encore_coordinator::Config::default()
            },
            reward_server: encore_reward_server::Config {
                listen: loopback,
                admin: loopback,
                coordinator: url.clone(),
                worker_token: Some(worker_token.clone()),
                shutdown_grace_ms: 2000,
                models: super::eval::REWARD_MODELS
                    .iter()
                    .map(|name| ModelSpec {
                        name: (*name).to_owned(),
                        path: rewards.join(name),
                    })
                    .collect(),
                ..encore_reward_server::Config::default()
            },
            actor: encore_actor::Config {
                coordinator: url.clone(),
                worker_token: Some(worker_token.clone()),
                admin: loopback,
                ..encore_actor::Config::default()
            },
            learner: encore_learner::Config {
                coordinator: url.clone(),
                worker_token: Some(worker_token),
                admin: loopback,
                work_dir: dir.join("learner"),
                keep_checkpoints: 20,
                ..encore_learner::Config::default()
            },
        };
        let config_file = dir.join("encore.toml");
        std::fs::write(&config_file, toml::to_string_pretty(&config)?)?;

        let mut processes = Vec::new();
        let mut spawn = |name: String, role: &str, env: Vec<(String, String)>| {
            let log = logs.join(format!("{name}.log"));
            let file = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let child = Command::new(std::env::current_exe()?)
                .args(["serve", role])
                .env("ENCORE_CONFIG", &config_file)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .envs(env)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            processes.push(Process { name, log, child });
            anyhow::Ok(())
        };
        spawn("coordinator".into(), "coordinator", Vec::new())?;
        spawn("reward-server".into(), "reward-server", Vec::new())?;
        for i in 0..plan.rl.actors {
            let work_dir = dir.join(format!("actor-{i}")).display().to_string();
            spawn(
                format!("actor-{i}"),
                "actor",
                vec![("ENCORE_ACTOR__WORK_DIR".into(), work_dir)],
            )?;
        }
        spawn("learner".into(), "learner", Vec::new())?;
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            processes,
            jobs: connect(&url, &client_token).await?,
            plan: plan.clone(),
        };
        cluster.check_alive()?;
        eprintln!(
            "    coordinator on {url}; processes: {}; logs in {}",
            cluster
                .processes
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            logs.display()
        );
        Ok(cluster)
    }

    /// Fails, naming the process and its log, if one has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.processes {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited ({status}); its log: {}\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 20)
                );
            }
        }
        Ok(())
    }

    /// Submits a job with the given stages from `base` and follows it to
    /// its end with a progress bar.
    pub async fn run_job(
        &mut self,
        name: &str,
        base: &Path,
        stages: &[(&str, u64)],
        frames: usize,
    ) -> anyhow::Result<JobRun> {
        let spec = self.spec(name, base, stages, frames)?;
        let total: u64 = stages.iter().map(|(_, steps)| steps).sum();
        let job = self
            .jobs
            .submit(SubmitJobRequest {
                idempotency_key: format!("quickstart-{name}"),
                spec: Some(spec),
                validate_only: false,
            })
            .await
            .with_context(|| format!("submitting job {name}"))?
            .into_inner()
            .job
            .ok_or_else(|| anyhow!("the coordinator answered Submit without a job"))?;
        let job_id = job.job_id;
        let mut events = self
            .jobs
            .watch(WatchJobRequest {
                job_id: job_id.clone(),
                after_sequence: Some(0),
            })
            .await?
            .into_inner();
        let mut bar = super::Progress::new(total, &format!("    job {name:<3}"));
        let mut points: Vec<MetricPoint> = Vec::new();
        let mut last_step_at = Instant::now();
        let mut end = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while end.is_none() {
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { break };
                    match event?.event {
                        Some(job_event::Event::Metrics(p)) => {
                            last_step_at = Instant::now();
                            bar.update(p.step, total, describe_point(&p));
                            points.push(p);
                        }
                        Some(job_event::Event::StateChange(c)) => {
                            let state = JobState::try_from(c.state).unwrap_or(JobState::Unspecified);
                            if matches!(state, JobState::Succeeded | JobState::Failed | JobState::Cancelled) {
                                end = Some((state, c.message));
                            }
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    self.check_alive()?;
                    if last_step_at.elapsed() > STALL {
                        bail!("job {name} ({job_id}) reported no step for {}s; logs in {}", STALL.as_secs(), self.dir.join("logs").display());
                    }
                }
            }
        }
        bar.finish();
        match end {
            Some((JobState::Succeeded, _)) => {}
            Some((state, message)) => bail!("job {name} ({job_id}) ended {state:?}: {message}"),
            None => bail!("the coordinator closed job {name}'s event stream before it ended"),
        }
        let mut stage_ends = Vec::new();
        let mut end_step = 0;
        for (stage, steps) in stages {
            end_step += steps;
            stage_ends.push(((*stage).to_owned(), end_step));
        }
        eprintln!(
            "    job {name} ({job_id}): {} steps, last {}",
            points.len(),
            points.last().map(describe_point).unwrap_or_default()
        );
        Ok(JobRun {
            name: name.to_owned(),
            checkpoints: self.dir.join("checkpoints").join(&job_id),
            job_id,
            points,
            stage_ends,
        })
    }

    fn spec(
        &self,
        name: &str,
        base: &Path,
        stages: &[(&str, u64)],
        frames: usize,
    ) -> anyhow::Result<JobSpec> {
        let rl = &self.plan.rl;
        let prompts = encore_corpus::Corpus::new(7, frames)
            .batch(encore_corpus::Split::Train, 1_000_000, rl.prompts)
            .into_iter()
            .enumerate()
            .map(|(i, e)| Prompt {
                prompt_id: format!("p{i}"),
                caption: e.caption,
                ..Prompt::default()
            })
            .collect();
        let stages = stages
            .iter()
            .map(|(stage, steps)| {
                let models: &[&str] = match *stage {
                    "R" => &["adherence", "quality"],
                    "U" => &["preference"],
                    other => bail!("unknown stage {other}"),
                };
                Ok(Stage {
                    name: (*stage).to_owned(),
                    rewards: models
                        .iter()
                        .map(|m| RewardConfig {
                            model: Some(ModelRef {
                                name: (*m).to_owned(),
                                ..ModelRef::default()
                            }),
                            weight: if *m == "adherence" {
                                rl.adherence_weight
                            } else {
                                1.0
                            },
                            normalization: Some(Normalization {
                                kind: NormalizationKind::RunningZScore as i32,
                                ..Normalization::default()
                            }),
                        })
                        .collect(),
                    stop: Some(StopCondition {
                        max_steps: Some(*steps),
                        ..StopCondition::default()
                    }),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(JobSpec {
            name: format!("quickstart {name}"),
            base_checkpoint: Some(ModelRef {
                name: "base".into(),
                uri: base.display().to_string(),
                sha256: String::new(),
            }),
            prompts: Some(PromptSource {
                source: Some(prompt_source::Source::Inline(PromptList { prompts })),
            }),
            algorithm: Some(Algorithm {
                kind: AlgorithmKind::Ppo as i32,
                samples_per_prompt: rl.samples_per_prompt,
                batch_size: rl.batch_size,
                learning_rate: rl.learning_rate,
                warmup_steps: 5,
                kl_coef: rl.kl_coef,
                entropy_coef: (rl.entropy_coef > 0.0).then_some(rl.entropy_coef),
                sampling: Some(SamplingParams {
                    max_new_tokens: u32::try_from(frames)?,
                    temperature: 1.0,
                    ..SamplingParams::default()
                }),
                ..Algorithm::default()
            }),
            stages,
            resources: Some(JobResources {
                actors: rl.actors,
                learner_ranks: 1,
                ..JobResources::default()
            }),
            // Checkpoints at the stage ends (and the job's end) only.
            checkpoint_every_steps: 100_000,
            ..JobSpec::default()
        })
    }

    /// SIGTERM to every process, then waits for each to exit (SIGKILL
    /// after 20 s); fails if one did not exit cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // Workers first, the coordinator last: they deregister from it.
        self.processes.reverse();
        let mut failed = Vec::new();
        for p in &mut self.processes {
            if let Err(why) = stop(&mut p.child, Duration::from_secs(20)).await {
                failed.push(format!("{} ({why})", p.name));
            }
        }
        if !failed.is_empty() {
            bail!(
                "not every process stopped cleanly: {}; logs in {}",
                failed.join(", "),
                self.dir.join("logs").display()
            );
        }
        Ok(())
    }
}

impl JobRun {
    /// Writes the policy as it was at the end of stage `stage` (0 = the
    /// first) as a checkpoint directory `dir`, loadable like the base.
    pub fn export_stage(&self, dir: &Path, base: &Path, stage: usize) -> anyhow::Result<PathBuf> {
        let (stage_name, step) = self
            .stage_ends
            .get(stage)
            .ok_or_else(|| anyhow!("job {} has no stage {stage}", self.name))?;
        let weights = self
            .checkpoints
            .join(format!("step-{step}"))
            .join("policy.safetensors");
        std::fs::create_dir_all(dir)?;
        std::fs::copy(&weights, dir.join("model.safetensors"))
            .with_context(|| format!("copying {}", weights.display()))?;
        let base_config = encore_model::read_config(base)?;
        let config = serde_json::json!({
            "policy": base_config.policy,
            "metadata": {
                "kind": "rl",
                "job": self.job_id,
                "through_stage": stage_name,
                "step": step,
            },
        });
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        Ok(dir.to_owned())
    }
}

/// The JobService client, once the coordinator answers (at most 60 s).
async fn connect(url: &str, token: &str) -> anyhow::Result<Jobs> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let endpoint = Channel::from_shared(url.to_owned())?;
    let mut delay = Duration::from_millis(20);
    loop {
        match endpoint.connect().await {
            Ok(channel) => {
                let token = BearerToken::new(token).map_err(|e| anyhow!(e))?;
                return Ok(JobServiceClient::with_interceptor(channel, token));
            }
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow!(e).context(format!("the coordinator at {url} did not answer")));
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// A metric point in a few words.
fn describe_point(p: &MetricPoint) -> String {
    let mut parts = vec![format!("[{}]", p.stage)];
    for (model, stats) in &p.rewards {
        parts.push(format!("{model} {:.3}", stats.mean));
    }
    parts.push(format!("KL {:.2}", p.kl));
    parts.join(" ")
}

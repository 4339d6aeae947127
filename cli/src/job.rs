//! `encore job`: submit, list, get, cancel and watch training jobs on any
//! coordinator.
//!
//! A job spec file is a `JobSpec` (proto/encore/v1/job.proto) in the proto3
//! JSON mapping, written as JSON or as TOML with the same field names
//! (`baseCheckpoint` or `base_checkpoint`, enum values by name, 64-bit
//! integers as numbers or strings); see `examples/`. The file is turned
//! into the message through the protocol's own descriptors, so every field
//! the coordinator knows is accepted and a misspelt one is an error naming
//! it. `--json` prints what the coordinator answers in the same mapping.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use encore_client::BearerToken;
use encore_client::CoordinatorTls;
use encore_proto::v1::job_service_client::JobServiceClient;
use encore_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobSpec, JobState, ListJobsRequest, MetricPoint, Page,
    SubmitJobRequest, WatchJobRequest, job_event,
};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// `encore job ...`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The coordinator's gRPC URL.
    #[arg(
        long,
        global = true,
        env = "ENCORE_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// For an https:// coordinator: the CA certificate (PEM) its
    /// certificate chains to.
    #[arg(long, global = true, env = "ENCORE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A client token of the coordinator (`auth.client_tokens`).
    #[arg(long, global = true, env = "ENCORE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the token (instead of --token).
    #[arg(long, global = true, env = "ENCORE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the coordinator's answers as proto3 JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: JobCommand,
}

/// The job subcommands.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job spec (TOML or JSON); prints the job id.
    Submit {
        /// The spec file.
        spec: PathBuf,
        /// Idempotency key: a retried submit with the same key and spec
        /// returns the same job. Default: a fresh key per invocation.
        #[arg(long)]
        key: Option<String>,
        /// Only validate the spec; nothing is stored.
        #[arg(long)]
        validate_only: bool,
        /// Watch the job after submitting it.
        #[arg(long)]
        watch: bool,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in these states (pending, running, succeeded, failed,
        /// cancelled).
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one job.
    Get {
        /// The job id.
        job_id: String,
    },
    /// Cancel a job.
    Cancel {
        /// The job id.
        job_id: String,
        /// Why, recorded with the job.
        #[arg(long, default_value = "cancelled with encore job cancel")]
        reason: String,
    },
    /// Follow a job's reward curves live until it ends.
    Watch {
        /// The job id.
        job_id: String,
    },
}

type Client = JobServiceClient<InterceptedService<Channel, BearerToken>>;

/// Runs `encore job ...`.
pub fn run(args: JobArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: JobArgs) -> anyhow::Result<()> {
    let token = token(&args)?;
    // A bad spec file is reported before any connection is made.
    let spec = match &args.command {
        JobCommand::Submit { spec, .. } => Some(read_spec(spec)?),
        _ => None,
    };
    let tls = args.tls_ca.clone().map(|ca| CoordinatorTls { ca });
    let endpoint = encore_client::endpoint::endpoint(&args.coordinator, tls.as_ref())
        // Named by the flags, not the config keys.
        .map_err(
            |e| match e.strip_prefix("tls.ca: ").or(e.strip_prefix("tls: ")) {
                Some(why) => anyhow::anyhow!("--tls-ca: {why}"),
                None => anyhow::anyhow!("--{e}"),
            },
        )?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", args.coordinator))?;
    let interceptor = BearerToken::new(&token).map_err(anyhow::Error::msg)?;
    let mut client = JobServiceClient::with_interceptor(channel, interceptor);
    let out = &mut std::io::stdout().lock();
    match args.command {
        JobCommand::Submit {
            spec: path,
            key,
            validate_only,
            watch,
        } => {
            let job = submit(&mut client, spec.unwrap_or_default(), key, validate_only).await?;
            if args.json {
                writeln!(out, "{}", to_json(&job)?)?;
            } else if validate_only {
                writeln!(out, "{}: valid", path.display())?;
            } else {
                writeln!(out, "{}", job.job_id)?;
            }
            if watch && !validate_only {
                return follow(&mut client, &job.job_id, args.json, out).await;
            }
        }
        JobCommand::List { state, limit } => {
            let states = state
                .iter()
                .map(|s| parse_state(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let jobs = list(&mut client, &states, limit).await?;
            if args.json {
                for job in &jobs {
                    writeln!(out, "{}", to_json(job)?)?;
                }
            } else {
                write_table(out, &jobs)?;
            }
        }
        JobCommand::Get { job_id } => {
            let job = client
                .get(GetJobRequest { job_id })
                .await
                .map_err(status_error)?
                .into_inner();
            if args.json {
                writeln!(out, "{}", to_json(&job)?)?;
            } else {
                write_job(out, &job)?;
            }
        }
        JobCommand::Cancel { job_id, reason } => {
            let job = client
                .cancel(CancelJobRequest { job_id, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            if args.json {
                writeln!(out, "{}", to_json(&job)?)?;
            } else {
                writeln!(out, "{} {}", job.job_id, state_name(job.state))?;
            }
        }
        JobCommand::Watch { job_id } => {
            return follow(&mut client, &job_id, args.json, out).await;
        }
    }
    Ok(())
}

fn token(args: &JobArgs) -> anyhow::Result<String> {
    let token = encore_config::secret("token", args.token.as_deref(), args.token_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    token.context("a client token is required: --token, --token-file or ENCORE_TOKEN")
}

/// A gRPC status as an error that says what the coordinator said.
fn status_error(status: tonic::Status) -> anyhow::Error {
    let details = tonic_types::StatusExt::get_error_details(&status);
    let mut message = format!(
        "{}: {}",
        encore_proto::status::code_name(status.code()),
        status.message()
    );
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            message.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    anyhow::Error::msg(message)
}

async fn submit(
    client: &mut Client,
    spec: JobSpec,
    key: Option<String>,
    validate_only: bool,
) -> anyhow::Result<Job> {
    let key = key.unwrap_or_else(|| {
        format!(
            "cli-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        )
    });
    let answer = client
        .submit(SubmitJobRequest {
            idempotency_key: key,
            spec: Some(spec),
            validate_only,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    answer.job.context("the coordinator answered without a job")
}

async fn list(client: &mut Client, states: &[JobState], limit: u32) -> anyhow::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    while (jobs.len() as u32) < limit {
        let page = client
            .list(ListJobsRequest {
                page: Some(Page {
                    page_size: (limit - jobs.len() as u32).min(1000),
                    page_token: page_token.clone(),
                }),
                states: states.iter().map(|s| *s as i32).collect(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    jobs.truncate(limit as usize);
    Ok(jobs)
}

/// Reads a spec file: JSON (`.json`) or TOML (anything else), in the proto3
/// JSON mapping.
pub fn read_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?
    };
    spec_from_value(value).with_context(|| format!("{}: not a JobSpec", path.display()))
}

/// The `JobSpec` a proto3-JSON value describes.
pub fn spec_from_value(value: serde_json::Value) -> anyhow::Result<JobSpec> {
    let descriptor = descriptors()?
        .get_message_by_name("encore.v1.JobSpec")
        .context("encore.v1.JobSpec is missing from the descriptors")?;
    let message = DynamicMessage::deserialize(descriptor, value)?;
    Ok(message.transcode_to::<JobSpec>()?)
}

fn descriptors() -> anyhow::Result<DescriptorPool> {
    DescriptorPool::decode(encore_proto::FILE_DESCRIPTOR_SET)
        .context("decoding the protocol's descriptors")
}

/// Protocol messages the CLI prints, with their full names.
trait Named: prost::Message + Default {
    const NAME: &'static str;
}
impl Named for Job {
    const NAME: &'static str = "encore.v1.Job";
}
impl Named for encore_proto::v1::JobEvent {
    const NAME: &'static str = "encore.v1.JobEvent";
}

/// A message in the proto3 JSON mapping (one line).
fn to_json<M: Named>(message: &M) -> anyhow::Result<String> {
    let descriptor = descriptors()?
        .get_message_by_name(M::NAME)
        .with_context(|| format!("{} is missing from the descriptors", M::NAME))?;
    let mut dynamic = DynamicMessage::new(descriptor);
    dynamic.transcode_from(message)?;
    let mut out = serde_json::Serializer::new(Vec::new());
    dynamic.serialize_with_options(&mut out, &SerializeOptions::new())?;
    Ok(String::from_utf8(out.into_inner())?)
}

fn parse_state(name: &str) -> anyhow::Result<JobState> {
    let upper = format!("JOB_STATE_{}", name.trim().to_ascii_uppercase());
    match JobState::from_str_name(&upper) {
        Some(JobState::Unspecified) | None => {
            bail!("--state {name:?}: expected pending, running, succeeded, failed or cancelled")
        }
        Some(state) => Ok(state),
    }
}

fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "UNSPECIFIED",
        JobState::Pending => "PENDING",
        JobState::Running => "RUNNING",
        JobState::Succeeded => "SUCCEEDED",
        JobState::Failed => "FAILED",
        JobState::Cancelled => "CANCELLED",
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".into(), ToString::to_string)
}

fn write_table(out: &mut impl Write, jobs: &[Job]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:<10} {:>6} {:<6} {:<30} NAME",
        "JOB", "STATE", "STEP", "STAGE", "CREATED"
    )?;
    for job in jobs {
        let name = job.spec.as_ref().map_or("", |s| s.name.as_str());
        writeln!(
            out,
            "{:<32} {:<10} {:>6} {:<6} {:<30} {name}",
            job.job_id,
            state_name(job.state),
            job.step,
            job.stage,
            time(job.create_time.as_ref()),
        )?;
    }
    Ok(())
}

fn write_job(out: &mut impl Write, job: &Job) -> std::io::Result<()> {
    let spec = job.spec.clone().unwrap_or_default();
    writeln!(out, "job       {}", job.job_id)?;
    writeln!(out, "name      {}", spec.name)?;
    writeln!(out, "state     {}", state_name(job.state))?;
    let stages: Vec<&str> = spec.stages.iter().map(|s| s.name.as_str()).collect();
    writeln!(
        out,
        "stage     {} (stages: {})",
        job.stage,
        stages.join(" -> ")
    )?;
    writeln!(out, "step      {}", job.step)?;
    writeln!(out, "created   {}", time(job.create_time.as_ref()))?;
    writeln!(out, "started   {}", time(job.start_time.as_ref()))?;
    writeln!(out, "ended     {}", time(job.end_time.as_ref()))?;
    if let Some(v) = &job.latest_version {
        writeln!(out, "version   {}", v.version)?;
    }
    if !job.failure_message.is_empty() {
        writeln!(out, "failure   {}", job.failure_message)?;
    }
    if !job.cancel_reason.is_empty() {
        writeln!(out, "cancelled {}", job.cancel_reason)?;
    }
    if let Some(p) = &job.latest_metrics {
        writeln!(out, "latest    {}", point_line(p))?;
    }
    Ok(())
}

/// One step in one line: rewards by model, combined reward, KL, loss.
fn point_line(p: &MetricPoint) -> String {
    let mut models: Vec<_> = p.rewards.iter().collect();
    models.sort_by(|a, b| a.0.cmp(b.0));
    let rewards: Vec<String> = models
        .iter()
        .map(|(m, s)| format!("{m} {:.3}", s.mean))
        .collect();
    format!(
        "step {:>5} [{}] {} | combined {:+.3} | kl {:.3} | loss {:+.4} | {:.1} rollouts/s",
        p.step,
        p.stage,
        rewards.join(", "),
        p.combined_reward_mean,
        p.kl,
        p.loss,
        p.rollouts_per_second
    )
}

/// Follows a job: one line per event, and on a terminal a live panel of
/// reward curves (sparklines per reward model and for KL) redrawn in place.
/// Returns an error when the job fails or is cancelled.
async fn follow(
    client: &mut Client,
    job_id: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut stream = client
        .watch(WatchJobRequest {
            job_id: job_id.to_owned(),
            after_sequence: Some(0),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let live = !json && std::io::stdout().is_terminal();
    let mut curves = Curves::default();
    let mut drawn = 0usize;
    let mut end = None;
    while let Some(event) = stream.next().await {
        let event = event.map_err(status_error)?;
        if json {
            writeln!(out, "{}", to_json(&event)?)?;
        }
        let line = match &event.event {
            Some(job_event::Event::Snapshot(job)) => Some(format!(
                "job {} {} at step {}",
                job.job_id,
                state_name(job.state),
                job.step
            )),
            Some(job_event::Event::StateChange(c)) => {
                let state = JobState::try_from(c.state).unwrap_or(JobState::Unspecified);
                if state.is_terminal() {
                    end = Some((state, c.message.clone()));
                }
                Some(format!(
                    "state {}{}",
                    state_name(c.state),
                    if c.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", c.message)
                    }
                ))
            }
            Some(job_event::Event::StageChange(c)) => {
                Some(format!("stage {} from step {}", c.stage, c.step))
            }
            Some(job_event::Event::Metrics(p)) => {
                curves.push(p);
                Some(point_line(p))
            }
            None => None,
        };
        if json {
            continue;
        }
        if live {
            // Clear the panel drawn last time, print the event above it,
            // draw the panel again.
            if drawn > 0 {
                write!(out, "\x1b[{drawn}A\x1b[J")?;
            }
            if let Some(line) = line {
                writeln!(out, "{line}")?;
            }
            let panel = curves.panel();
            drawn = panel.len();
            for row in panel {
                writeln!(out, "{row}")?;
            }
        } else if let Some(line) = line {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    match end {
        Some((JobState::Succeeded, _)) => Ok(()),
        Some((state, message)) => {
            bail!("job {job_id} ended {}: {message}", state_name(state as i32))
        }
        None => bail!("the watch of job {job_id} ended before the job did"),
    }
}

/// Reward, KL and combined-reward curves of the steps seen so far.
#[derive(Debug, Default)]
struct Curves {
    /// (stage/model, values by step).
    rewards: Vec<(String, Vec<f64>)>,
    combined: Vec<f64>,
    kl: Vec<f64>,
}

impl Curves {
    fn push(&mut self, p: &MetricPoint) {
        for (model, stats) in &p.rewards {
            let name = format!("{}/{model}", p.stage);
            match self.rewards.iter_mut().find(|(n, _)| *n == name) {
                Some((_, values)) => values.push(stats.mean),
                None => self.rewards.push((name, vec![stats.mean])),
            }
        }
        self.combined.push(p.combined_reward_mean);
        self.kl.push(p.kl);
    }

    fn panel(&self) -> Vec<String> {
        if self.kl.is_empty() {
            return Vec::new();
        }
        let mut rows = vec![String::from("── reward curves (last 60 steps) ──")];
        let row = |name: &str, values: &[f64]| {
            let last = values.last().copied().unwrap_or(0.0);
            format!("{name:>22} {} {last:>9.3}", sparkline(values, 60))
        };
        for (name, values) in &self.rewards {
            rows.push(row(name, values));
        }
        rows.push(row("combined", &self.combined));
        rows.push(row("kl (nats/clip)", &self.kl));
        rows
    }
}

/// The last `width` values as block characters scaled to their range.
fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let tail = &values[values.len().saturating_sub(width)..];
    let (lo, hi) = tail
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = hi - lo;
    let line: String = tail
        .iter()
        .map(|&v| {
            let level = if span > 0.0 { (v - lo) / span } else { 0.5 };
            BARS[((level * 7.0).round() as usize).min(7)]
        })
        .collect();
    format!("{line:<width$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_specs_read_the_same_message() {
        let toml: serde_json::Value = toml::from_str(
            r#"
            name = "ru"
            [baseCheckpoint]
            uri = "runs/base"
            [[stages]]
            name = "R"
            stop = { maxSteps = 20 }
            [[stages.rewards]]
            model = { name = "quality" }
            weight = 1.0
            normalization = { kind = "NORMALIZATION_KIND_RUNNING_Z_SCORE" }
            "#,
        )
        .unwrap();
        let json = serde_json::json!({
            "name": "ru",
            "base_checkpoint": {"uri": "runs/base"},
            "stages": [{
                "name": "R",
                "stop": {"maxSteps": "20"},
                "rewards": [{"model": {"name": "quality"}, "weight": 1,
                             "normalization": {"kind": "NORMALIZATION_KIND_RUNNING_Z_SCORE"}}]
            }]
        });
        let a = spec_from_value(toml).unwrap();
        let b = spec_from_value(json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.stages[0].stop.as_ref().unwrap().max_steps, Some(20));
        assert_eq!(a.base_checkpoint.as_ref().unwrap().uri, "runs/base");
    }

    #[test]
    fn a_misspelt_field_is_an_error_naming_it() {
        let err = spec_from_value(serde_json::json!({"name": "x", "stagez": []})).unwrap_err();
        assert!(err.to_string().contains("stagez"), "{err}");
    }

    #[test]
    fn states_parse_by_short_name_only() {
        assert_eq!(parse_state("running").unwrap(), JobState::Running);
        assert_eq!(parse_state("FAILED").unwrap(), JobState::Failed);
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("runing").is_err());
    }

    #[test]
    fn the_live_panel_has_a_curve_per_stage_and_model() {
        let mut curves = Curves::default();
        assert!(curves.panel().is_empty(), "nothing to draw before a step");
        for (step, stage, model, mean) in [
            (1, "R", "quality", 3.0),
            (2, "R", "quality", 3.5),
            (3, "U", "preference", 0.1),
        ] {
            let mut p = MetricPoint {
                step,
                stage: stage.into(),
                kl: step as f64,
                ..MetricPoint::default()
            };
            p.rewards.insert(
                model.into(),
                encore_proto::v1::RewardStats { mean, std: 0.0 },
            );
            curves.push(&p);
        }
        let panel = curves.panel();
        assert_eq!(panel.len(), 5, "{panel:#?}");
        assert!(panel[1].contains("R/quality") && panel[1].trim_end().ends_with("3.500"));
        assert!(panel[2].contains("U/preference"));
        assert!(panel[4].contains("kl") && panel[4].contains("▁▅█"));
    }

    #[test]
    fn sparklines_scale_to_their_range() {
        assert_eq!(sparkline(&[0.0, 1.0, 2.0], 3), "▁▅█");
        assert_eq!(sparkline(&[5.0, 5.0], 2), "▅▅");
        assert_eq!(sparkline(&[0.0, 7.0, 14.0], 2).chars().count(), 2);
    }
}

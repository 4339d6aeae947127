//! The quick start's report directory:
//!
//! - `summary.md`: what ran, how long each phase took, the reward models'
//!   held-out figures, the win-rate table, and where everything is;
//! - `curves.csv`, `reward-<model>.png`, `kl.png`, `entropy.png`: every
//!   job's step metrics;
//! - `winrates.csv`: the table as data;
//! - `diversity.csv`: how diverse each model's evaluation clips are;
//! - `audio/NN-<model>.wav`: the first evaluation clip of each held-out
//!   prompt, for the base and fine-tuned models, with `audio/prompts.txt`.

use std::fmt::Write as _;
use std::path::Path;

use encore_reward_train::{self as train, TrainReport};

use super::Plan;
use super::cluster::JobRun;
use super::eval::{Evaluation, REWARD_MODELS};
use encore_cli::plot::{Chart, Marker, Series, write_png};

/// Everything the report is made of.
pub(super) struct Inputs<'a> {
    pub dir: &'a Path,
    pub plan: &'a Plan,
    pub jobs: &'a [&'a JobRun],
    pub evaluation: &'a Evaluation,
    pub rewards: &'a [(String, TrainReport)],
    pub data_notes: &'a [String],
    pub phases: &'a [(String, f64)],
    pub total_seconds: f64,
}

/// Writes the report; returns the win-rate table as Markdown.
pub(super) fn write(inputs: &Inputs<'_>) -> anyhow::Result<String> {
    let dir = inputs.dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("audio"))?;
    curves(inputs)?;
    let audio = audio(inputs)?;
    let table = win_table(inputs.evaluation);
    std::fs::write(dir.join("winrates.csv"), win_csv(inputs.evaluation))?;
    std::fs::write(dir.join("diversity.csv"), diversity_csv(inputs.evaluation))?;
    std::fs::write(dir.join("summary.md"), summary(inputs, &table, &audio)?)?;
    std::fs::write(
        dir.join("plan.json"),
        serde_json::to_vec_pretty(inputs.plan)?,
    )?;
    Ok(table)
}

/// `curves.csv` and the plots.
fn curves(inputs: &Inputs<'_>) -> anyhow::Result<()> {
    let mut csv = String::from(
        "job,step,stage,combined,kl,adherence,quality,preference,clip_fraction,staleness,policy_version,entropy\n",
    );
    for job in inputs.jobs {
        for p in &job.points {
            let r = |m: &str| {
                p.rewards
                    .get(m)
                    .map_or(String::new(), |s| s.mean.to_string())
            };
            writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{},{},{}",
                job.name,
                p.step,
                p.stage,
                p.combined_reward_mean,
                p.kl,
                r("adherence"),
                r("quality"),
                r("preference"),
                p.clip_fraction,
                p.staleness_mean,
                p.policy_version,
                p.entropy
            )?;
        }
    }
    std::fs::write(inputs.dir.join("curves.csv"), csv)?;

    // Stage boundaries of the multi-stage job.
    let markers: Vec<Marker> = inputs
        .jobs
        .iter()
        .filter(|j| j.stage_ends.len() > 1)
        .flat_map(|j| {
            j.stage_ends[..j.stage_ends.len() - 1]
                .iter()
                .zip(&j.stage_ends[1..])
                .map(move |((_, end), (next, _))| Marker {
                    x: *end as f64 + 0.5,
                    label: format!("{}: stage {next} begins", j.name),
                })
        })
        .collect();
    let series_of = |value: &dyn Fn(&encore_proto::v1::MetricPoint) -> Option<f64>| -> Vec<Series> {
        inputs
            .jobs
            .iter()
            .map(|j| Series {
                name: format!("job {}", j.name),
                points: j
                    .points
                    .iter()
                    .map(|p| (p.step as f64, value(p).unwrap_or(f64::NAN)))
                    .collect(),
            })
            // A job without this reward (job U has no quality reward) gets
            // no legend entry.
            .filter(|s| s.points.iter().any(|(_, y)| y.is_finite()))
            .collect()
    };
    for model in REWARD_MODELS {
        let series = series_of(&|p| p.rewards.get(model).map(|s| s.mean));
        write_png(
            &inputs.dir.join(format!("reward-{model}.png")),
            &Chart {
                title: &format!("{model} reward (batch mean, raw score)"),
                x_label: "step",
                y_label: model,
                series: &series,
                markers: &markers,
            },
        )?;
    }
    let series = series_of(&|p| Some(p.entropy));
    write_png(
        &inputs.dir.join("entropy.png"),
        &Chart {
            title: "policy entropy (nats per step, -log p of the sampled tokens)",
            x_label: "step",
            y_label: "entropy",
            series: &series,
            markers: &markers,
        },
    )?;
    let series = series_of(&|p| Some(p.kl));
    write_png(
        &inputs.dir.join("kl.png"),
        &Chart {
            title: "KL to the base policy (nats per clip, k3 estimate)",
            x_label: "step",
            y_label: "KL",
            series: &series,
            markers: &markers,
        },
    )
}

/// WAV files of the base and fine-tuned models' first clip per prompt;
/// returns the Markdown lines listing them.
fn audio(inputs: &Inputs<'_>) -> anyhow::Result<Vec<String>> {
    let e = inputs.evaluation;
    let n = inputs.plan.eval.wav_prompts.min(e.captions.len());
    let mut lines = Vec::new();
    let mut prompts = String::new();
    for i in 0..n {
        writeln!(prompts, "{:02}: {}", i + 1, e.captions[i])?;
        let mut files = Vec::new();
        for (mi, model) in e.models.iter().enumerate() {
            let Some(tokens) = e.clips[mi][i].first() else {
                continue;
            };
            let name = format!("{:02}-{}.wav", i + 1, model.to_lowercase());
            let audio = encore_cli::normalise(encore_codec::render(tokens)?);
            encore_codec::write_wav(&inputs.dir.join("audio").join(&name), &audio)?;
            files.push(format!("[{model}](audio/{name})"));
        }
        lines.push(format!("- \"{}\": {}", e.captions[i], files.join(", ")));
    }
    std::fs::write(inputs.dir.join("audio").join("prompts.txt"), prompts)?;
    Ok(lines)
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}%", 100.0 * x)
    } else {
        "n/a".into()
    }
}

/// The win-rate table in Markdown: each judge population's win rate,
/// answers and expected win rate, then the reward models'.
fn win_table(e: &Evaluation) -> String {
    let mut head = String::from("| comparison |");
    let mut rule = String::from("| --- |");
    for j in &e.judges {
        let _ = write!(head, " {}: A wins | (A / B / tie) | expected |", j.name);
        rule.push_str(" ---: | ---: | ---: |");
    }
    head.push_str(" adherence RM | quality RM | preference RM |\n");
    rule.push_str(" ---: | ---: | ---: |\n");
    let mut t = head + &rule;
    for p in &e.pairs {
        let _ = write!(t, "| {} vs {} |", p.a, p.b);
        for v in &p.by_judge {
            let (a, b, tie) = v.answers;
            let _ = write!(
                t,
                " **{}** | {a} / {b} / {tie} | {} |",
                pct(v.win_rate()),
                pct(v.expected)
            );
        }
        let _ = writeln!(
            t,
            " {} | {} | {} |",
            pct(p.by_reward_model[0]),
            pct(p.by_reward_model[1]),
            pct(p.by_reward_model[2]),
        );
    }
    t
}

/// `winrates.csv`: one row per comparison; the first judge's columns keep
/// their `held_out_` names, the shifted judge's are `shifted_`.
fn win_csv(e: &Evaluation) -> String {
    let mut csv = String::from("a,b");
    let prefixes: Vec<&str> = e
        .judges
        .iter()
        .map(|j| j.name.split_whitespace().next().unwrap_or("judge"))
        .map(|w| if w == "held-out" { "held_out" } else { w })
        .collect();
    for p in &prefixes {
        let _ = write!(csv, ",{p}_win_rate,{p}_a,{p}_b,{p}_tie,{p}_expected");
    }
    csv.push_str(",adherence_rm,quality_rm,preference_rm\n");
    for p in &e.pairs {
        let _ = write!(csv, "{},{}", p.a, p.b);
        for v in &p.by_judge {
            let (a, b, tie) = v.answers;
            let _ = write!(csv, ",{},{a},{b},{tie},{}", v.win_rate(), v.expected);
        }
        let _ = writeln!(
            csv,
            ",{},{},{}",
            p.by_reward_model[0], p.by_reward_model[1], p.by_reward_model[2]
        );
    }
    csv
}

/// `diversity.csv`: one row per model.
fn diversity_csv(e: &Evaluation) -> String {
    let mut csv = String::from(
        "model,entropy,distinct,within_identical,within_near,across_identical,across_near,across_agreement\n",
    );
    for (model, d) in e.models.iter().zip(&e.diversity) {
        let _ = writeln!(
            csv,
            "{model},{},{},{},{},{},{},{}",
            d.entropy,
            d.distinct,
            d.within_identical,
            d.within_near,
            d.across_identical,
            d.across_near,
            d.across_agreement
        );
    }
    csv
}

/// The diversity table in Markdown.
fn diversity_table(e: &Evaluation) -> String {
    let mut t = String::from(
        "| model | entropy (nats/step) | distinct clips | same prompt: identical | near-identical | different prompts: identical | near-identical | notes agreeing |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (model, d) in e.models.iter().zip(&e.diversity) {
        let _ = writeln!(
            t,
            "| {model} | {:.3} | {} | {} | {} | {} | {} | {} |",
            d.entropy,
            pct(d.distinct),
            pct(d.within_identical),
            pct(d.within_near),
            pct(d.across_identical),
            pct(d.across_near),
            pct(d.across_agreement)
        );
    }
    t
}

fn summary(inputs: &Inputs<'_>, table: &str, audio: &[String]) -> anyhow::Result<String> {
    let e = inputs.evaluation;
    let plan = inputs.plan;
    let mut md = String::from("# Encore quick start\n\n");
    writeln!(
        md,
        "MusicRL's method at laptop scale: a tiny base policy pretrained on the procedural corpus, \
         three reward models trained on simulated raters, and RL fine-tuning with a KL penalty \
         (β = {}) through a local cluster (coordinator on the embedded store, one reward server, \
         {} actors, one learner rank, each its own process, gRPC on loopback). \
         Scale `{}`; {:.0} s in all.\n",
        plan.rl.kl_coef,
        plan.rl.actors,
        serde_json::to_value(plan.scale)?.as_str().unwrap_or("?"),
        inputs.total_seconds
    )?;

    md.push_str("## Who wins\n\n");
    writeln!(
        md,
        "Each model sampled {} clip(s) for each of {} held-out prompts; a comparison sets A's clip \
         against B's for the same prompt. **Held-out raters** are {} simulated personas whose \
         answers trained no reward model (`Population::held_out`), drawn around the same \
         population means as the raters behind the data. **Shifted raters** are {} personas of \
         another audience (`Population::shifted`, `Tastes::SHIFTED`): they weigh adherence more \
         and polish less, like the instruments the training raters dislike, and prefer a lower \
         register, soft playing and slower lines. Each rater answers every comparison once, and \
         the win rate leaves ties out. \"Expected\" is their mean choice probability, the same \
         figure without sampling noise. A reward model's column is the share of comparisons \
         where A's clip scores higher.\n",
        plan.eval.samples,
        plan.eval.prompts,
        e.judges.first().map_or(0, |j| j.raters.len()),
        e.judges.get(1).map_or(0, |j| j.raters.len())
    )?;
    md.push_str(table);
    md.push_str(
        "\nThe models: **base** (pretrained), **R** (fine-tuned on adherence + quality, the RU \
         job's first stage), **U** (fine-tuned on user preference alone, its own job), **RU** \
         (stage R, then stage U).\n\n",
    );

    md.push_str("## Mean scores of each model's clips\n\n");
    md.push_str(
        "What the reward models say, next to the simulator's ground truth that no judge sees \
         directly: the clips' prompt adherence (0-1, attributes the prompt mentions that the \
         clip has), latent quality (1-5), and notes per second (the raters' tastes centre on \
         about 3). A reward model's score that rises while the truth does not is reward \
         hacking.\n\n",
    );
    md.push_str(
        "| model | adherence RM | quality RM (1-5) | preference RM (logit) | true adherence | true quality | notes/s |",
    );
    for j in &e.judges {
        write!(md, " {}' utility |", j.name)?;
    }
    md.push_str("\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    md.push_str(&" ---: |".repeat(e.judges.len()));
    md.push('\n');
    for (mi, model) in e.models.iter().enumerate() {
        let [a, q, p] = e.means[mi];
        let (true_a, true_q, rate) = e.truth[mi];
        write!(
            md,
            "| {model} | {a:.3} | {q:.3} | {p:.3} | {true_a:.3} | {true_q:.3} | {rate:.2} |"
        )?;
        for u in &e.utility[mi] {
            write!(md, " {u:.3} |")?;
        }
        md.push('\n');
    }

    md.push_str(
        "\nTrue adherence attribute by attribute: the mean score over the clips whose prompt \
         mentions it (1 when the clip has it; the key scores its in-key share of notes, the \
         mode is scored alone when no key is named, the mood by velocity and articulation).\n\n\
         | model |",
    );
    for name in encore_corpus::analysis::ADHERENCE_ATTRIBUTES {
        write!(md, " {name} |")?;
    }
    md.push_str("\n| --- |");
    md.push_str(&" ---: |".repeat(encore_corpus::analysis::ADHERENCE_ATTRIBUTES.len()));
    md.push('\n');
    for (model, scores) in e.models.iter().zip(&e.adherence_by_attribute) {
        write!(md, "| {model} |")?;
        for score in scores {
            match score {
                Some(x) => write!(md, " {x:.3} |")?,
                None => md.push_str(" - |"),
            }
        }
        md.push('\n');
    }

    md.push_str(
        "\nWhat each judge's utility is made of, term by term (means over the judge's raters \
         and the model's clips; the terms sum to the utility above): the rater's weight times \
         adherence, times `(quality - 3) / 2`, and the taste terms that neither reward model \
         of stage R sees (liking of the instruments, closeness of the median pitch and of the \
         note rate to the rater's preferred ones, liking of loud or soft playing).\n\n\
         | model | judge | adherence | quality | instrument | register | loudness | note rate | taste (sum) |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (mi, model) in e.models.iter().enumerate() {
        for (j, judge) in e.judges.iter().enumerate() {
            let [a, q, i, r, l, n] = e.utility_parts[mi][j];
            writeln!(
                md,
                "| {model} | {} | {a:.3} | {q:.3} | {i:.3} | {r:.3} | {l:.3} | {n:.3} | {:.3} |",
                judge.name,
                i + r + l + n
            )?;
        }
    }

    md.push_str("\n## Diversity\n\n");
    writeln!(
        md,
        "A model that answers every prompt with the same clip has collapsed, whatever its win \
         rate. Per-step entropy is the mean `-log p` of the sampled tokens (temperature 1). Two \
         clips are compared by their notes: they *agree* on the frames where either starts a \
         note and both start the same one (held and silent frames, which every clip has many \
         of, are left out), and are near-identical when they agree on at least {:.0}% of them. \
         \"Different prompts\" compares clip s of every pair of held-out prompts, \"same prompt\" \
         every pair of one prompt's samples (`diversity.csv`).\n",
        100.0 * super::eval::NEAR_IDENTICAL
    )?;
    md.push_str(&diversity_table(e));
    md.push_str(
        "\nShare of each reward model's score variance that lies between one prompt's own \
         samples (the rest lies between prompts, which the per-prompt baseline removes):\n\n\
         | model | adherence RM | quality RM | preference RM |\n| --- | ---: | ---: | ---: |\n",
    );
    for (model, w) in e.models.iter().zip(&e.within_prompt_share) {
        writeln!(
            md,
            "| {model} | {} | {} | {} |",
            pct(w[0]),
            pct(w[1]),
            pct(w[2])
        )?;
    }
    md.push_str(
        "\nHow often a reward model orders two samples of one prompt as the truth does \
         (pairs whose truth ties left out; 50% says nothing): what the per-prompt advantage \
         of stage R can learn from it on each model's own clips.\n\n\
         | model | adherence RM vs true adherence | quality RM vs latent quality |\n\
         | --- | ---: | ---: |\n",
    );
    for (model, [a, q]) in e.models.iter().zip(&e.fidelity) {
        writeln!(md, "| {model} | {} | {} |", pct(*a), pct(*q))?;
    }

    md.push_str("\n## Training curves\n\n");
    md.push_str(
        "Batch means of each reward model's raw score and the KL to the base, per step \
         (`curves.csv` has every figure):\n\n",
    );
    for model in REWARD_MODELS {
        writeln!(md, "![{model}](reward-{model}.png)\n")?;
    }
    md.push_str("![KL](kl.png)\n\n![entropy](entropy.png)\n\n");
    for job in inputs.jobs {
        if let (Some(first), Some(last)) = (job.points.first(), job.points.last()) {
            writeln!(
                md,
                "- job {} (`{}`): {} steps, combined normalised reward {:.3} → {:.3}, KL {:.2} → {:.2} nats per clip",
                job.name,
                job.job_id,
                job.points.len(),
                first.combined_reward_mean,
                last.combined_reward_mean,
                first.kl,
                last.kl
            )?;
        }
    }

    md.push_str("\n## Listen\n\nThe first evaluation clip of each model for the first held-out prompts (`audio/`):\n\n");
    for line in audio {
        writeln!(md, "{line}")?;
    }

    md.push_str("\n## Reward models (held-out figures)\n\n");
    for line in inputs.data_notes {
        writeln!(md, "- {line}")?;
    }
    for (name, report) in inputs.rewards {
        writeln!(
            md,
            "- {name}: {} ({} training examples, {:.0} s)",
            train::describe(report),
            report.train_examples,
            report.seconds
        )?;
    }

    md.push_str("\n## Time\n\n| phase | seconds |\n| --- | ---: |\n");
    for (phase, seconds) in inputs.phases {
        writeln!(md, "| {phase} | {seconds:.0} |")?;
    }
    md.push_str(
        "\nSettings: `plan.json`. The cluster's configuration and each process's log are under \
         `../cluster/`, the policies under `../policies/`, the datasets under `../data/`.\n",
    );
    Ok(md)
}

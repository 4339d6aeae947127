//! `encore quickstart --scale test`: every phase at toy size through the
//! real binary, which starts its cluster (coordinator on the embedded
//! store, reward server, 2 actors, a learner) as `encore serve` child
//! processes. The numbers mean nothing at this scale; the test checks that
//! the report is whole and that a second run takes the cached base policy
//! and reward models.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn quickstart(out: &Path, cache: &Path) -> String {
    quickstart_at("test", out, cache)
}

fn quickstart_at(scale: &str, out: &Path, cache: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_encore"))
        .args(["quickstart", "--scale", scale, "--out"])
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .env("RUST_LOG", "warn")
        .output()
        .expect("encore runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "quickstart failed:\n{stderr}");
    stderr
}

/// `diversity.csv` of a report: model -> column -> value.
fn diversity(report: &Path) -> BTreeMap<String, BTreeMap<String, f64>> {
    let csv = std::fs::read_to_string(report.join("diversity.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let columns = header[1..]
                .iter()
                .zip(&fields[1..])
                .map(|(h, v)| ((*h).to_owned(), v.parse::<f64>().unwrap()))
                .collect();
            (fields[0].to_owned(), columns)
        })
        .collect()
}

/// Fails, naming the model, if more than `identical` of the pairs of clips
/// for different held-out prompts are identical, or more than `near` are
/// near-identical.
fn assert_prompts_get_their_own_clips(report: &Path, identical: f64, near: f64) {
    let d = diversity(report);
    assert_eq!(
        d.keys().cloned().collect::<Vec<_>>(),
        ["R", "RU", "U", "base"],
        "{d:?}"
    );
    for (model, c) in &d {
        assert!(
            c["across_identical"] <= identical,
            "{model}: different prompts got identical clips: {c:?}"
        );
        assert!(
            c["across_near"] <= near,
            "{model}: different prompts got near-identical clips: {c:?}"
        );
        assert!(c["entropy"] > 0.0, "{model}: {c:?}");
    }
}

/// The whole quick start at its default scale (about 10 minutes on 2
/// cores): no fine-tuned model may answer different prompts with the same
/// or near-identical clips in more than 1% of the pairs (with the
/// settings before issue 16, RU did in 16% of them). Run with
/// `cargo test --workspace --test quickstart -- --ignored`; set
/// `ENCORE_QUICKSTART_CACHE` to reuse a cache of base policy and reward
/// models.
#[test]
#[ignore = "the default scale takes about 10 minutes"]
fn at_the_default_scale_different_prompts_get_different_clips() {
    let dir = tempfile::tempdir().unwrap();
    let cache = std::env::var_os("ENCORE_QUICKSTART_CACHE")
        .map_or_else(|| dir.path().join("cache"), Into::into);
    let out = dir.path().join("run");
    quickstart_at("default", &out, &cache);
    assert_prompts_get_their_own_clips(&out.join("report"), 0.01, 0.01);
}

#[test]
fn quickstart_writes_a_whole_report_and_reuses_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (out, cache) = (dir.path().join("run"), dir.path().join("cache"));
    let first = quickstart(&out, &cache);
    assert!(!first.contains("cached"), "{first}");
    let report = out.join("report");

    // The table: six comparisons, each judged by the held-out raters and
    // the three reward models.
    let summary = std::fs::read_to_string(report.join("summary.md")).unwrap();
    for row in [
        "| R vs base |",
        "| U vs base |",
        "| RU vs base |",
        "| RU vs R |",
        "| RU vs U |",
        "| U vs R |",
    ] {
        assert!(summary.contains(row), "{row} missing from\n{summary}");
    }
    assert!(summary.contains("shifted raters"), "{summary}");
    let wins = std::fs::read_to_string(report.join("winrates.csv")).unwrap();
    assert_eq!(wins.lines().count(), 7, "{wins}");
    let header: Vec<&str> = wins.lines().next().unwrap().split(',').collect();
    for line in wins.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), header.len(), "{line}");
        // Both judge populations answered every comparison.
        for judge in ["held_out", "shifted"] {
            let at = |c: &str| {
                let i = header.iter().position(|h| *h == format!("{judge}_{c}"));
                fields[i.unwrap_or_else(|| panic!("{judge}_{c} in {header:?}"))]
            };
            let (a, b, tie): (u64, u64, u64) = (
                at("a").parse().unwrap(),
                at("b").parse().unwrap(),
                at("tie").parse().unwrap(),
            );
            assert!(a + b + tie > 0, "the {judge} raters answered: {line}");
            let rate: f64 = at("win_rate").parse().unwrap();
            assert!((rate - a as f64 / (a + b) as f64).abs() < 1e-9, "{line}");
        }
    }

    // Diversity: even at this scale, where the policies are barely
    // trained, no two prompts may get the same clip (a sampler seeded
    // per prompt the same way would give them).
    assert!(summary.contains("## Diversity"), "{summary}");
    assert_prompts_get_their_own_clips(&report, 0.0, 1.0);

    // Curves: every step of both jobs (RU: 2 + 2 steps, U: 2), with the
    // stage each ran in and the rewards of that stage.
    let curves = std::fs::read_to_string(report.join("curves.csv")).unwrap();
    let rows: Vec<Vec<&str>> = curves
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let steps = |job: &str| -> Vec<(String, String)> {
        rows.iter()
            .filter(|r| r[0] == job)
            .map(|r| (r[1].to_owned(), r[2].to_owned()))
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    assert_eq!(
        steps("RU"),
        pairs(&[("1", "R"), ("2", "R"), ("3", "U"), ("4", "U")]),
        "{curves}"
    );
    assert_eq!(steps("U"), pairs(&[("1", "U"), ("2", "U")]), "{curves}");
    for r in &rows {
        let (adherence, preference) = (r[5], r[7]);
        assert_eq!(r[2] == "R", !adherence.is_empty(), "{r:?}");
        assert_eq!(r[2] == "U", !preference.is_empty(), "{r:?}");
    }

    // Plots are PNGs; clips are WAVs with sound in them.
    for plot in [
        "reward-adherence.png",
        "reward-quality.png",
        "reward-preference.png",
        "kl.png",
    ] {
        let bytes = std::fs::read(report.join(plot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{plot}");
    }
    for model in ["base", "r", "u", "ru"] {
        let wav = report.join("audio").join(format!("01-{model}.wav"));
        let mut reader = hound::WavReader::open(&wav).unwrap();
        let loudest = reader
            .samples::<i16>()
            .map(|s| s.unwrap().unsigned_abs())
            .max()
            .unwrap_or(0);
        assert!(loudest > 3000, "{} is silent", wav.display());
    }

    // The cluster ran as separate processes, each with its own log.
    for role in [
        "coordinator",
        "reward-server",
        "actor-0",
        "actor-1",
        "learner",
    ] {
        assert!(
            out.join("cluster/logs")
                .join(format!("{role}.log"))
                .exists(),
            "{role}"
        );
    }

    // A second run reuses the base policy, the judged pairs of its clips
    // and the reward models.
    let second = quickstart(&out, &cache);
    assert!(second.contains("base pairs: cached"), "{second}");
    assert_eq!(second.matches("cached").count(), 5, "{second}");
}

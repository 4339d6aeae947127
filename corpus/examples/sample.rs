//! Prints a few corpus examples with what the analyzer recovers from them,
//! and optionally renders them to WAV files to listen to.
//!
//! `cargo run -p encore-corpus --example sample -- [N] [OUT_DIR]`

use std::path::PathBuf;

use encore_corpus::{Corpus, Split, analyze};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(8);
    let out: Option<PathBuf> = args.next().map(PathBuf::from);
    let corpus = Corpus::new(0, 250);
    for index in 0..n {
        let x = corpus.example(Split::Train, index);
        let a = analyze(&x.tokens);
        println!("#{index}: {}", x.caption);
        println!("    attributes: {}", serde_json::to_string(&x.attributes)?);
        println!(
            "    analysed:   instrument {:?}, tempo {:?}, density {:?} ({:.2} onsets/beat), register {:?}, key {:?}, articulation {:?}",
            a.instrument,
            a.tempo,
            a.density,
            a.onsets_per_beat.unwrap_or(0.0),
            a.register,
            a.key,
            a.articulation()
        );
        let shown: Vec<String> = x.tokens.iter().take(60).map(|t| t.to_string()).collect();
        println!("    tokens:     {} ...", shown.join(" "));
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("example_{index:03}.wav"));
            encore_codec::write_wav(&path, &encore_codec::render(&x.tokens)?)?;
            println!("    wrote {}", path.display());
        }
    }
    Ok(())
}

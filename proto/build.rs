//! Compiles `encore/v1/*.proto` into Rust at build time, without a system
//! `protoc`: `protox` (a pure-Rust protobuf compiler) parses the files into a
//! `FileDescriptorSet`, which `tonic-prost-build` turns into prost messages
//! and tonic clients and servers. The encoded descriptor set, with imports
//! and source comments, is also written to `OUT_DIR` for gRPC reflection.

use std::env;
use std::fs;
use std::path::PathBuf;

/// Name of the encoded descriptor set in `OUT_DIR`, included by `lib.rs`.
const DESCRIPTOR_FILE: &str = "encore_v1_descriptor.bin";

fn main() {
    if let Err(err) = run() {
        eprintln!("error: failed to compile the encore.v1 protos: {err}");
        std::process::exit(1);
    }
}

/// A protox error with the `file:line:column` of each place it points at,
/// which its Display form alone leaves out.
fn located(err: protox::Error) -> Box<dyn std::error::Error> {
    use miette::Diagnostic;
    let mut message = err.to_string();
    let Some(file) = err.file() else {
        return message.into();
    };
    let spans: Vec<String> = match (err.source_code(), err.labels()) {
        (Some(source), Some(labels)) => labels
            .filter_map(|label| {
                let span = source.read_span(label.inner(), 0, 0).ok()?;
                let text = label
                    .label()
                    .map(|text| format!(": {text}"))
                    .unwrap_or_default();
                Some(format!(
                    "{file}:{}:{}{text}",
                    span.line() + 1,
                    span.column() + 1
                ))
            })
            .collect(),
        _ => Vec::new(),
    };
    if spans.is_empty() {
        message.push_str(&format!("\n  --> {file}"));
    }
    for span in spans {
        message.push_str(&format!("\n  --> {span}"));
    }
    message.into()
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = root.join("encore").join("v1");
    // A directory here makes Cargo rerun this script when any file in it
    // changes, is added or is removed.
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let mut files = Vec::new();
    for entry in fs::read_dir(&proto_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            // Import-style names ("encore/v1/job.proto"), relative to the
            // include root, so the descriptors carry the same names as the
            // import statements.
            files.push(path.strip_prefix(&root)?.to_path_buf());
        }
    }
    // Sorted so that the descriptor set, and the generated code, do not
    // depend on directory order.
    files.sort();

    // The well-known types (google/protobuf/*.proto) come bundled with
    // protox. Imports are kept in the set so that reflection clients can
    // resolve every type from it alone; source info keeps the comments, which
    // become rustdoc and are checked by the crate's tests.
    let mut compiler = protox::Compiler::new([&root]).map_err(located)?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(&files).map_err(located)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join(DESCRIPTOR_FILE),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

//! Compiles `proto/millrace/v1/*.proto` with the pure-Rust `protox`, so no system `protoc`
//! is needed, then generates prost types and tonic services from the descriptor set, which is
//! also kept (encoded) for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let dir = root.join("millrace/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "proto"));
    files.sort();
    // New .proto files too, not only changes to the ones seen last time.
    println!("cargo:rerun-if-changed={}", dir.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    // For gRPC reflection: every service serves the descriptors of all Millrace contracts.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("millrace_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Stored as JSON by the sink and returned by its HTTP API.
        .type_attribute("millrace.v1.Verdict", "#[derive(serde::Serialize, serde::Deserialize)]")
        .type_attribute("millrace.v1.StageTiming", "#[derive(serde::Serialize, serde::Deserialize)]")
        // Carried in the result row that ingest answers from.
        .type_attribute("millrace.v1.TokenLogprob", "#[derive(serde::Serialize, serde::Deserialize)]")
        .type_attribute("millrace.v1.TopLogprob", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_fds(fds)?;
    Ok(())
}

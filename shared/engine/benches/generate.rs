//! Engine bench: greedy generation of 32 new tokens for ~40-token chat prompts at several
//! batch sizes, on the provider in `MILLRACE_PROVIDER` (cpu, cuda, auto). Prints a table, and
//! writes the same figures as JSON to the file `MILLRACE_BENCH_JSON` names, if set (what
//! scripts/bench-mesh.sh reads):
//! `{"model", "provider", "max_new_tokens", "rows": [{"batch", "prompt_tokens", "new_tokens",
//! "seconds", "new_tokens_per_s", "completions_per_s"}]}`.
//!
//! `cargo bench -p millrace-engine --bench generate`
//! Env: `MILLRACE_MODELS_DIR` (default models/prepared), `MILLRACE_MODEL` (default
//! smollm2-135m), `MILLRACE_BENCH_BATCHES` (default "1,8,16,32"), `MILLRACE_INTRA_THREADS`,
//! `MILLRACE_BENCH_JSON`.
use std::path::PathBuf;
use std::time::Instant;

use millrace_engine::{ChatMessage, GenerationRequest, Manifest, RuntimeOptions};

const NEW_TOKENS: usize = 32;
const QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Give me a short tip for writing clear code.",
    "What do mills use water for?",
];

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() {
    let dir = PathBuf::from(env("MILLRACE_MODELS_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/prepared")));
    let model = env("MILLRACE_MODEL", "smollm2-135m");
    let provider = env("MILLRACE_PROVIDER", "cpu");
    let options = RuntimeOptions {
        provider: provider.parse().expect("MILLRACE_PROVIDER"),
        intra_threads: env("MILLRACE_INTRA_THREADS", "0").parse().expect("MILLRACE_INTRA_THREADS"),
        ..Default::default()
    };
    let manifest = Manifest::load(&dir).expect("manifest");
    let template = manifest.chat_template(&model).expect("chat template");
    let mut generator = manifest.generator(&model, &options).expect("generator");
    let batches: Vec<usize> =
        env("MILLRACE_BENCH_BATCHES", "1,8,16,32").split(',').map(|b| b.trim().parse().expect("batch size")).collect();
    let prompt =
        |i: usize| template.render(&[ChatMessage::new("user", QUESTIONS[i % QUESTIONS.len()])], true).expect("render");
    // Warm-up: first runs allocate and pick kernels.
    generator.generate(&[GenerationRequest::new(prompt(0), 4)], |_, _| ()).expect("warm-up");

    println!(
        "\nMillrace engine: {model}, provider {provider}, up to {NEW_TOKENS} new tokens (greedy; a request ends at EOS)"
    );
    println!("| batch | prompt tokens | seconds | new tokens/s | completions/s |");
    println!("|------:|--------------:|--------:|-------------:|--------------:|");
    let mut rows = Vec::new();
    for &batch in &batches {
        let requests: Vec<_> = (0..batch).map(|i| GenerationRequest::new(prompt(i), NEW_TOKENS)).collect();
        let started = Instant::now();
        let out = generator.generate(&requests, |_, _| ()).expect("generate");
        let seconds = started.elapsed().as_secs_f64();
        let new_tokens: usize = out.iter().map(|g| g.token_ids.len()).sum();
        let prompt_tokens: usize = out.iter().map(|g| g.prompt_tokens).sum();
        let (tokens_per_s, completions_per_s) = (new_tokens as f64 / seconds, batch as f64 / seconds);
        println!(
            "| {batch:>5} | {prompt_tokens:>13} | {seconds:>7.2} | {tokens_per_s:>12.1} | {completions_per_s:>13.2} |"
        );
        rows.push(serde_json::json!({
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "seconds": seconds,
            "new_tokens_per_s": tokens_per_s,
            "completions_per_s": completions_per_s,
        }));
    }
    if let Ok(path) = std::env::var("MILLRACE_BENCH_JSON") {
        let report = serde_json::json!({
            "model": model,
            "provider": provider,
            "max_new_tokens": NEW_TOKENS,
            "rows": rows,
        });
        let text = serde_json::to_string_pretty(&report).expect("bench report");
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("MILLRACE_BENCH_JSON={path}: {e}"));
    }
}

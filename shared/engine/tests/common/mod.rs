//! What the engine's model tests share: the prepared manifest, the runtime options and chat
//! prompts. Env (as the bench reads them): `MILLRACE_MODELS_DIR` (default models/prepared) and
//! `MILLRACE_PROVIDER` (cpu, cuda, auto; default cpu), so the same binaries check a GPU host.
use std::path::PathBuf;

use millrace_engine::{ChatMessage, ExecutionProvider, Manifest, RuntimeOptions};

pub const MODEL: &str = "smollm2-135m";
pub const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

pub fn manifest() -> Manifest {
    let dir = std::env::var_os("MILLRACE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/prepared"));
    Manifest::load(&dir).unwrap_or_else(|e| panic!("{e}: the model tests need scripts/prepare-models.sh"))
}

pub fn options() -> RuntimeOptions {
    let provider = std::env::var("MILLRACE_PROVIDER").map_or(Ok(ExecutionProvider::Cpu), |p| p.parse());
    RuntimeOptions { provider: provider.expect("MILLRACE_PROVIDER"), intra_threads: 2, ..Default::default() }
}

/// `question` as the model's chat template renders it after the default system prompt.
pub fn chat(question: &str) -> String {
    let template = manifest().chat_template(MODEL).unwrap();
    template.render(&[ChatMessage::new("system", SYSTEM), ChatMessage::new("user", question)], true).unwrap()
}

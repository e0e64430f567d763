//! The inference service's configuration: every flag also reads its `MILLRACE_…` env var.
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use millrace_engine::{ExecutionProvider, RuntimeOptions};
use millrace_runtime::ShellArgs;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "inference", about = "Millrace inference: BATCHES into COMPLETIONS, and gRPC Generate/Embed/Classify")]
pub struct InferenceConfig {
    /// Folder holding `manifest.json` (written by `scripts/prepare-models.sh`).
    #[arg(long, env = "MILLRACE_MODELS_DIR", default_value = "models/prepared")]
    pub models_dir: PathBuf,
    /// The generation model this process serves (a manifest name); batches for it are consumed.
    #[arg(long, env = "MILLRACE_INFERENCE_MODEL", default_value = "smollm2-135m")]
    pub model: String,
    /// Embedding model for `Embed`; empty disables it.
    #[arg(long, env = "MILLRACE_INFERENCE_EMBED_MODEL", default_value = "minilm-l6")]
    pub embed_model: String,
    /// Classifier for `Classify`; empty disables it.
    #[arg(long, env = "MILLRACE_INFERENCE_CLASSIFY_MODEL", default_value = "profanity")]
    pub classify_model: String,
    /// Execution provider: cpu, cuda (or fail) or auto (CUDA when it registers, else CPU).
    #[arg(long, env = "MILLRACE_INFERENCE_PROVIDER", default_value = "cpu")]
    pub provider: ExecutionProvider,
    /// Generator sessions in this process: how many batches (or direct calls) run at once.
    #[arg(long, env = "MILLRACE_INFERENCE_SESSIONS", default_value = "1")]
    pub sessions: NonZeroUsize,
    /// Intra-op threads per ONNX Runtime session (0 = ONNX Runtime's choice).
    #[arg(long, env = "MILLRACE_INFERENCE_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,
    /// `max_new_tokens` of a request that asks for 0 (proto3's "not given").
    #[arg(long, env = "MILLRACE_INFERENCE_MAX_NEW_TOKENS_DEFAULT", default_value_t = 64)]
    pub max_new_tokens_default: usize,
    /// gRPC `millrace.v1.Inference` and health.
    #[arg(long, env = "MILLRACE_INFERENCE_GRPC_ADDR", default_value = "127.0.0.1:50055")]
    pub grpc_addr: SocketAddr,
    #[command(flatten)]
    pub shell: ShellArgs,
}

impl InferenceConfig {
    pub const ADMIN_PORT: u16 = 9185;

    pub fn runtime_options(&self) -> RuntimeOptions {
        // No library here: the engine takes ORT_DYLIB_PATH, then the manifest's library.
        RuntimeOptions { provider: self.provider, intra_threads: self.intra_threads, ..Default::default() }
    }

    /// The embedding model, unless disabled.
    pub fn embed_model(&self) -> Option<&str> {
        Some(self.embed_model.as_str()).filter(|m| !m.is_empty())
    }

    /// The classifier, unless disabled.
    pub fn classify_model(&self) -> Option<&str> {
        Some(self.classify_model.as_str()).filter(|m| !m.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_and_disabling_the_side_models() {
        let c = InferenceConfig::parse_from(["inference"]);
        assert_eq!((c.model.as_str(), c.sessions.get(), c.max_new_tokens_default), ("smollm2-135m", 1, 64));
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50055");
        assert_eq!(c.provider, ExecutionProvider::Cpu);
        assert_eq!((c.embed_model(), c.classify_model()), (Some("minilm-l6"), Some("profanity")));
        let c = InferenceConfig::parse_from(["inference", "--embed-model=", "--classify-model=", "--provider=auto"]);
        assert_eq!((c.embed_model(), c.classify_model()), (None, None));
        assert_eq!(c.provider, ExecutionProvider::Auto);
        assert!(InferenceConfig::try_parse_from(["inference", "--provider=tpu"]).is_err());
        assert!(InferenceConfig::try_parse_from(["inference", "--sessions=0"]).is_err());
    }
}

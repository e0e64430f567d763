//! The inference service's configuration: every flag also reads its `MILLRACE_…` env var.
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use millrace_engine::{BatchingPolicy, ExecutionProvider, RuntimeOptions, SchedulerConfig};
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
    /// Generator sessions in this process, each with its own generation loop and running set
    /// (with one ONNX thread each, several use more cores than one session's kernels can).
    #[arg(long, env = "MILLRACE_INFERENCE_SESSIONS", default_value = "1")]
    pub sessions: NonZeroUsize,
    /// continuous: sequences join and leave the running set at every decode step; static: a
    /// batch runs until its last sequence ends (the benchmarks' baseline).
    #[arg(long, env = "MILLRACE_INFERENCE_BATCHING", default_value = "continuous")]
    pub batching: BatchingPolicy,
    /// Most sequences decoding together, per session.
    #[arg(long, env = "MILLRACE_INFERENCE_MAX_RUNNING", default_value = "32")]
    pub max_running: NonZeroUsize,
    /// KV the running set of a session may reserve, in tokens (a sequence reserves its prompt
    /// plus its `max_new_tokens`); at least the model's context.
    #[arg(long, env = "MILLRACE_INFERENCE_KV_BUDGET_TOKENS", default_value_t = 16_384)]
    pub kv_budget_tokens: usize,
    /// Prompt tokens prefilled per step, so a long prompt does not stall the others' tokens.
    #[arg(long, env = "MILLRACE_INFERENCE_PREFILL_CHUNK_TOKENS", default_value = "128")]
    pub prefill_chunk_tokens: NonZeroUsize,
    /// KV of earlier prompts and conversations kept for reuse, in tokens per session (0: none).
    #[arg(long, env = "MILLRACE_INFERENCE_PREFIX_CACHE_TOKENS", default_value_t = 16_384)]
    pub prefix_cache_tokens: usize,
    /// Longest pause between two capacity reports, milliseconds.
    #[arg(long, env = "MILLRACE_INFERENCE_CAPACITY_HEARTBEAT_MS", default_value = "250")]
    pub capacity_heartbeat_ms: NonZeroU64,
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

    pub fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            policy: self.batching,
            max_running: self.max_running.get(),
            kv_budget_tokens: self.kv_budget_tokens,
            prefill_chunk_tokens: self.prefill_chunk_tokens.get(),
            prefix_cache_tokens: self.prefix_cache_tokens,
        }
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
        assert_eq!(
            c.scheduler(),
            SchedulerConfig {
                policy: BatchingPolicy::Continuous,
                max_running: 32,
                kv_budget_tokens: 16_384,
                prefill_chunk_tokens: 128,
                prefix_cache_tokens: 16_384,
            }
        );
        assert_eq!(InferenceConfig::parse_from(["inference", "--batching=static"]).batching, BatchingPolicy::Static);
        assert!(InferenceConfig::try_parse_from(["inference", "--batching=dynamic"]).is_err());
        assert_eq!((c.embed_model(), c.classify_model()), (Some("minilm-l6"), Some("profanity")));
        let c = InferenceConfig::parse_from(["inference", "--embed-model=", "--classify-model=", "--provider=auto"]);
        assert_eq!((c.embed_model(), c.classify_model()), (None, None));
        assert_eq!(c.provider, ExecutionProvider::Auto);
        assert!(InferenceConfig::try_parse_from(["inference", "--provider=tpu"]).is_err());
        assert!(InferenceConfig::try_parse_from(["inference", "--sessions=0"]).is_err());
    }
}

//! Millrace's ONNX Runtime engine, usable without NATS: the model manifest, batched generation
//! with a KV cache, iteration-level scheduling with prefix KV reuse, sampling, chat templates, embeddings and classification.
pub mod classify;
pub mod constrain;
pub mod embed;
pub mod generate;
pub mod manifest;
pub mod prefix_cache;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
pub mod template;

pub use classify::Classifier;
pub use constrain::{Constraint, Grammars, OutputGrammar};
pub use embed::{Embedded, Embedder};
pub use generate::{DecoderSpec, FinishReason, Generation, GenerationRequest, Generator, TokenLogprob};
pub use manifest::Manifest;
pub use runtime::{ExecutionProvider, RuntimeOptions};
pub use sampling::SamplingParams;
pub use scheduler::{BatchingPolicy, Event, Load, Scheduler, SchedulerConfig, SequenceId, StepReport};
pub use template::{ChatMessage, ChatTemplate};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("ONNX Runtime library: {0}")]
    Runtime(String),
    #[error("model manifest: {0}")]
    Manifest(String),
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("onnx runtime: {0}")]
    Ort(#[from] ort::Error),
}

impl From<ort::Error<ort::session::builder::SessionBuilder>> for EngineError {
    fn from(e: ort::Error<ort::session::builder::SessionBuilder>) -> Self {
        Self::Ort(e.into())
    }
}

//! The preprocess binary: configuration, the models' tokenizers, then the service shell running
//! the QUERIES consumer.
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use millrace_bus::StageConsumer;
use millrace_bus::topology::ConsumerSpec;
use millrace_preprocess::budget::TokenModels;
use millrace_preprocess::clean::Preprocessor;
use millrace_preprocess::config::PreprocessConfig;
use millrace_preprocess::stage::PreprocessStage;
use millrace_runtime::{Service, consumer_child};
use tracing::info;

fn main() -> ExitCode {
    let config = PreprocessConfig::parse();
    Service::new("preprocess", config.shell.clone(), PreprocessConfig::ADMIN_PORT).run(|setup| async move {
        let dir = config.models_dir.clone();
        let models = tokio::task::spawn_blocking(move || TokenModels::load(&dir)).await??;
        let policy = config.policy();
        info!(
            models = ?models.names(),
            max_chars = policy.max_chars,
            reserve_tokens = policy.reserve_tokens,
            overflow = ?policy.overflow,
            redact = %policy.detectors,
            "preprocess policy"
        );
        let preprocessor = Arc::new(Preprocessor::new(policy, models));
        let publisher = setup.connect_bus().await?;
        let stage = PreprocessStage { preprocessor, publisher: publisher.clone() };
        let queries = StageConsumer::new(ConsumerSpec::PREPROCESS, stage, publisher, config.shell.bus.clone());
        Ok(vec![consumer_child(queries)])
    })
}

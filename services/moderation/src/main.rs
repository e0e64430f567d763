//! The moderation binary: configuration, the policy and the classifier, then the service shell
//! running the policy watcher, the two stage consumers and the gRPC API.
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use millrace_bus::StageConsumer;
use millrace_bus::topology::ConsumerSpec;
use millrace_moderation::config::ModerationConfig;
use millrace_moderation::grpc::ModerationApi;
use millrace_moderation::moderator::{ClassifierPool, Moderator, PolicyStore};
use millrace_moderation::reload;
use millrace_moderation::stage::{InputStage, OutputStage};
use millrace_proto::v1::moderation_server::ModerationServer;
use millrace_runtime::{ChildSpec, Service, consumer_child, serve_grpc};
use tracing::info;

fn main() -> ExitCode {
    let config = ModerationConfig::parse();
    Service::new("moderation", config.shell.clone(), ModerationConfig::ADMIN_PORT).run(|setup| async move {
        let store = Arc::new(PolicyStore::open(config.policy.as_deref())?);
        let policy = store.current();
        let source = config.policy.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in default".into());
        info!(%source, version = policy.version(), categories = ?policy.category_names().collect::<Vec<_>>(), "policy loaded");
        let classifier = match config.classifier() {
            Some(name) => {
                let (dir, name) = (config.models_dir.clone(), name.to_owned());
                let (sessions, threads) = (config.classifier_sessions, config.intra_threads);
                let pool = tokio::task::spawn_blocking(move || ClassifierPool::load(&dir, &name, sessions, threads)).await??;
                Some(Arc::new(pool))
            }
            None => None,
        };
        let moderator = Moderator::new(store.clone(), classifier);
        let publisher = setup.connect_bus().await?;
        let bus = config.shell.bus.clone();
        let input = InputStage { moderator: moderator.clone(), publisher: publisher.clone() };
        let output = OutputStage { moderator: moderator.clone(), publisher: publisher.clone() };
        let input = StageConsumer::new(ConsumerSpec::MODERATION_INPUT, input, publisher.clone(), bus.clone());
        let output = StageConsumer::new(ConsumerSpec::MODERATION_OUTPUT, output, publisher, bus);
        let grpc = setup.grpc_router().add_service(ModerationServer::new(ModerationApi { moderator }));
        let (poll, grpc_addr) = (config.policy_poll(), config.grpc_addr);
        Ok(vec![
            ChildSpec::new("policy-watcher", move |ctx| {
                let store = store.clone();
                async move { Ok(reload::watch(store, poll, ctx.shutdown.clone(), || ctx.set_ready()).await?) }
            }),
            consumer_child(input),
            consumer_child(output),
            ChildSpec::new("grpc-api", move |ctx| serve_grpc(ctx, grpc_addr, grpc.clone())),
        ])
    })
}

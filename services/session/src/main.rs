//! The session binary: configuration, the models' templates and tokenizers, the KV bucket,
//! then the service shell running the ADMITTED and RESULTS consumers and the gRPC API.
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use millrace_bus::StageConsumer;
use millrace_bus::topology::ConsumerSpec;
use millrace_proto::v1::sessions_server::SessionsServer;
use millrace_runtime::{ChildSpec, Service, consumer_child, serve_grpc};
use millrace_session::config::SessionConfig;
use millrace_session::grpc::SessionsApi;
use millrace_session::limiter::{RateLimiter, SystemClock};
use millrace_session::prompt::PromptModels;
use millrace_session::stage::{AdmittedStage, ResultsStage, SessionCore};
use millrace_session::store::{NatsKv, SessionStore};
use tracing::info;

fn main() -> ExitCode {
    let config = SessionConfig::parse();
    Service::new("session", config.shell.clone(), SessionConfig::ADMIN_PORT).run(|setup| async move {
        let dir = config.models_dir.clone();
        let models = tokio::task::spawn_blocking(move || PromptModels::load(&dir)).await??;
        let publisher = setup.connect_bus().await?;
        let bus = config.shell.bus.clone();
        let kv =
            NatsKv::open(publisher.jetstream(), &config.bucket, config.idle_ttl(), bus.storage(), bus.stream_replicas)
                .await?;
        info!(
            models = ?models.names(),
            bucket = config.bucket,
            max_turns = config.max_turns,
            idle_ttl_s = config.idle_ttl_s,
            reserve_tokens = config.reserve_tokens,
            rate_per_s = config.rate_per_s,
            burst = config.burst,
            "session policy"
        );
        let core = Arc::new(SessionCore {
            store: SessionStore::new(kv, config.cas_retry()),
            models,
            limiter: RateLimiter::new(config.rate_per_s, config.burst.get(), Arc::new(SystemClock)),
            policy: config.prompt_policy(),
            max_turns: config.max_turns.get(),
            idle_ttl: config.idle_ttl(),
        });
        let admitted = AdmittedStage { core: core.clone(), publisher: publisher.clone() };
        let admitted = StageConsumer::new(ConsumerSpec::SESSION, admitted, publisher.clone(), bus.clone());
        let results = ResultsStage { core: core.clone(), max_deliver: bus.max_deliver.max(1) as u64 };
        let results = StageConsumer::new(ConsumerSpec::SESSION_RESULTS, results, publisher.clone(), bus);
        let grpc = setup.grpc_router().add_service(SessionsServer::new(SessionsApi { core }));
        let grpc_addr = config.grpc_addr;
        Ok(vec![
            consumer_child(admitted),
            consumer_child(results),
            ChildSpec::new("grpc-api", move |ctx| serve_grpc(ctx, grpc_addr, grpc.clone())),
        ])
    })
}

//! The inference binary: configuration, model loading (which starts the generation loops), then
//! the service shell running the cancel listener, the capacity reporter, the BATCHES consumer
//! and the gRPC API.
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use millrace_bus::{ConsumerSpec, StageConsumer};
use millrace_inference::cancel::CancelRegistry;
use millrace_inference::capacity::CapacityReporter;
use millrace_inference::config::InferenceConfig;
use millrace_inference::grpc::InferenceApi;
use millrace_inference::pool::Engines;
use millrace_inference::request::Defaults;
use millrace_inference::stage::BatchStage;
use millrace_proto::v1::inference_server::InferenceServer;
use millrace_runtime::{ChildSpec, Service, cancel_listener_child, consumer_child, serve_grpc};

fn main() -> ExitCode {
    let config = InferenceConfig::parse();
    Service::new("inference", config.shell.clone(), InferenceConfig::ADMIN_PORT).run(|setup| async move {
        let loading = config.clone();
        let engines = Arc::new(tokio::task::spawn_blocking(move || Engines::load(&loading)).await??);
        let publisher = setup.connect_bus().await?;
        let defaults = Defaults { max_new_tokens: config.max_new_tokens_default };
        let cancels = CancelRegistry::new(config.shell.bus.cancel_memory());
        // Each batch holds a worker until its last member ends; every member may be running, so
        // as many batches as sequences can run are pulled (the batcher sends no more than the
        // capacity reports allow; this bound covers a batcher that has no report yet).
        let mut bus = config.shell.bus.clone();
        bus.workers = config.sessions.get() * config.max_running.get();
        let reporter = Arc::new(CapacityReporter {
            loops: engines.generation.clone(),
            client: publisher.client(),
            model: config.model.clone(),
            replica: format!("{}-{:08x}", std::process::id(), rand::random::<u32>()),
            heartbeat: Duration::from_millis(config.capacity_heartbeat_ms.get()),
        });
        let stage =
            BatchStage { engines: engines.clone(), cancels: cancels.clone(), publisher: publisher.clone(), defaults };
        let batches = StageConsumer::new(ConsumerSpec::INFERENCE, stage, publisher.clone(), bus);
        let grpc = setup.grpc_router().add_service(InferenceServer::new(InferenceApi { engines, defaults }));
        let grpc_addr = config.grpc_addr;
        Ok(vec![
            cancel_listener_child(&publisher, move |request_id: String| {
                cancels.cancel(&request_id);
                std::future::ready(())
            }),
            ChildSpec::new("capacity-reporter", move |ctx| {
                let reporter = reporter.clone();
                async move { reporter.run(ctx.shutdown.clone(), || ctx.set_ready()).await }
            }),
            consumer_child(batches),
            ChildSpec::new("grpc-api", move |ctx| serve_grpc(ctx, grpc_addr, grpc.clone())),
        ])
    })
}

//! The batcher binary: configuration, then the service shell running the batch queue (with
//! its capacity follower), the cancel listener and the PROMPTS consumer.
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use millrace_batcher::config::BatcherConfig;
use millrace_batcher::stage::{self, Batching, PromptStage};
use millrace_bus::{ConsumerSpec, StageConsumer};
use millrace_runtime::{ChildSpec, Service, cancel_listener_child, consumer_child};

fn main() -> ExitCode {
    let config = BatcherConfig::parse();
    Service::new("batcher", config.shell.clone(), BatcherConfig::ADMIN_PORT).run(|setup| async move {
        let publisher = setup.connect_bus().await?;
        let bus = config.shell.bus.clone();
        let (queue, inbox) = stage::channel(bus.workers.max(1) + 64);
        let batching = Arc::new(Batching {
            limits: config.limits(),
            publisher: publisher.clone(),
            count_every: config.in_flight_poll(),
            expected_new_tokens: config.expected_new_tokens,
            bus: bus.clone(),
            fault_abort_after_publish: config.fault_abort_after_publish,
        });
        let prompts = StageConsumer::deferring(
            ConsumerSpec::BATCHER,
            PromptStage { queue: queue.clone() },
            publisher.clone(),
            bus,
        );
        Ok(vec![
            ChildSpec::new("batch-queue", move |ctx| {
                let (inbox, batching) = (inbox.clone(), batching.clone());
                async move { Ok(stage::run(&inbox, &batching, ctx.shutdown.clone(), || ctx.set_ready()).await?) }
            }),
            cancel_listener_child(&publisher, move |request_id: String| {
                let queue = queue.clone();
                async move { queue.cancel(&request_id).await }
            }),
            consumer_child(prompts),
        ])
    })
}

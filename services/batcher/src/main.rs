//! The batcher binary: configuration, then the service shell running the batch queue, the
//! cancel listener and the PROMPTS consumer.
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use millrace_batcher::config::BatcherConfig;
use millrace_batcher::stage::{self, Batching, PromptStage, STAGE};
use millrace_bus::StageConsumer;
use millrace_bus::topology::ConsumerSpec;
use millrace_runtime::{ChildSpec, Service, consumer_child};
use tracing::warn;

fn main() -> ExitCode {
    let config = BatcherConfig::parse();
    Service::new("batcher", config.shell.clone(), BatcherConfig::ADMIN_PORT).run(|setup| async move {
        let publisher = setup.connect_bus().await?;
        let bus = config.shell.bus.clone();
        if bus.workers < config.max_batch_size.get() {
            // Each queued prompt holds a worker until its batch is published.
            warn!(
                workers = bus.workers,
                max_batch_size = config.max_batch_size,
                "fewer workers than max batch size: batches never fill by size"
            );
        }
        let (queue, inbox) = stage::channel(bus.workers.max(1) + 64);
        let batching = Arc::new(Batching {
            limits: config.limits(),
            publisher: publisher.clone(),
            count_every: config.in_flight_poll(),
            cancel_remember: config.cancel_remember(),
            cancel_capacity: BatcherConfig::CANCEL_CAPACITY,
            fault_abort_after_publish: config.fault_abort_after_publish,
        });
        let handler = PromptStage { queue: queue.clone(), publisher: publisher.clone() };
        let prompts =
            Arc::new(StageConsumer::new(STAGE, ConsumerSpec::BATCHER, Arc::new(handler), publisher.clone(), bus));
        let client = publisher.client();
        Ok(vec![
            ChildSpec::new("batch-queue", move |ctx| {
                let (inbox, batching) = (inbox.clone(), batching.clone());
                async move { Ok(stage::run(&inbox, &batching, ctx.shutdown.clone(), || ctx.set_ready()).await?) }
            }),
            ChildSpec::new("cancel-listener", move |ctx| {
                let (client, queue) = (client.clone(), queue.clone());
                async move {
                    let cancel = |request_id: String| {
                        let queue = queue.clone();
                        async move { queue.cancel(&request_id).await }
                    };
                    Ok(millrace_bus::follow_cancels(client, ctx.shutdown.clone(), || ctx.set_ready(), cancel).await?)
                }
            }),
            consumer_child("prompt-consumer", prompts),
        ])
    })
}

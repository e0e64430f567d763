//! Capacity reports: this replica's load (`ReplicaCapacity`) on core NATS
//! `mr.v1.capacity.<model>`, sent whenever a generation loop's load changes and at least every
//! heartbeat. The batcher hands a replica only as much work as the reports say it can start, so
//! requests wait in the batcher's ordered, fair queue instead of in a replica's FIFO.
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use millrace_bus::topology::ephemeral;
use millrace_proto::v1::ReplicaCapacity;
use millrace_proto::{Message as _, now_unix_ms};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::generation::GenerationLoops;
use crate::metrics;

pub struct CapacityReporter {
    pub loops: Arc<GenerationLoops>,
    pub client: Client,
    pub model: String,
    /// Unique per process: a restarted replica is a new one.
    pub replica: String,
    pub heartbeat: Duration,
}

impl CapacityReporter {
    /// Reports until `shutdown`; `on_ready` once the first report is out.
    pub async fn run(&self, shutdown: CancellationToken, on_ready: impl FnOnce()) -> anyhow::Result<()> {
        let mut changed = self.loops.watch();
        let subject = ephemeral::capacity(&self.model);
        let mut on_ready = Some(on_ready);
        loop {
            let load = self.loops.load();
            metrics::record_load(&load);
            let report = ReplicaCapacity {
                replica: self.replica.clone(),
                model: self.model.clone(),
                running: load.running as u32,
                waiting: load.waiting as u32,
                max_running: load.max_running as u32,
                kv_budget_tokens: load.kv_budget_tokens as u64,
                kv_used_tokens: load.kv_used_tokens as u64,
                prefix_cache_tokens: load.prefix_cache_tokens as u64,
                sent_unix_ms: now_unix_ms(),
                heartbeat_ms: self.heartbeat.as_millis() as u32,
            };
            // Best effort, like the token stream: the next change or heartbeat sends it again.
            if let Err(e) = self.client.publish(subject.clone(), report.encode_to_vec().into()).await {
                debug!(error = %e, "capacity report not sent");
            }
            if let Some(ready) = on_ready.take() {
                ready();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = changed.changed() => {}
                _ = tokio::time::sleep(self.heartbeat) => {}
            }
        }
    }
}

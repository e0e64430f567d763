//! Bus settings shared by every service (each flag also reads a `MILLRACE_…` env var).
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;

#[derive(Debug, Clone, clap::Args)]
pub struct BusSettings {
    /// NATS server URL.
    #[arg(long, env = "MILLRACE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Stream storage: file (durable) or memory.
    #[arg(long, env = "MILLRACE_STREAM_STORAGE", default_value = "file", value_parser = ["file", "memory"])]
    pub stream_storage: String,
    /// Per-stream message limit; past it publishes are refused (discard new) and ingest answers 429.
    #[arg(long, env = "MILLRACE_STREAM_MAX_MSGS", default_value_t = 1_000_000)]
    pub stream_max_msgs: i64,
    /// Per-stream byte limit (discard new).
    #[arg(long, env = "MILLRACE_STREAM_MAX_BYTES", default_value_t = 1 << 30)]
    pub stream_max_bytes: i64,
    /// Oldest age a message may reach in a stream, seconds.
    #[arg(long, env = "MILLRACE_STREAM_MAX_AGE_S", default_value_t = 24 * 3600)]
    pub stream_max_age_s: u64,
    /// Duplicate-detection window for Nats-Msg-Id, seconds; must cover the longest retry horizon.
    #[arg(long, env = "MILLRACE_DUPLICATE_WINDOW_S", default_value_t = 600)]
    pub duplicate_window_s: u64,
    /// How long the server waits for an ack before redelivering, seconds.
    #[arg(long, env = "MILLRACE_ACK_WAIT_S", default_value_t = 30)]
    pub ack_wait_s: u64,
    /// Deliveries before a message is dead-lettered.
    #[arg(long, env = "MILLRACE_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// Unacked messages a consumer may hold (bounds in-flight work per consumer).
    #[arg(long, env = "MILLRACE_MAX_ACK_PENDING", default_value_t = 1024)]
    pub max_ack_pending: i64,
    /// Publishes awaiting their PubAck at once, per process (the pipelining window).
    #[arg(long, env = "MILLRACE_PUBLISH_WINDOW", default_value_t = 512)]
    pub publish_window: usize,
    /// How long a publish waits for its PubAck, milliseconds.
    #[arg(long, env = "MILLRACE_PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub publish_timeout_ms: u64,
    /// Concurrent workers per stage consumer.
    #[arg(long, env = "MILLRACE_WORKERS", default_value_t = 64)]
    pub workers: usize,
    /// How long a cancel notice is remembered for a request that has not reached this stage yet,
    /// seconds (past the longest deadline ingest grants, the request has expired anyway).
    #[arg(long, env = "MILLRACE_CANCEL_REMEMBER_S", default_value_t = 600)]
    pub cancel_remember_s: u64,
    /// Most cancel notices remembered at once; the oldest are forgotten first.
    #[arg(long, env = "MILLRACE_CANCEL_MEMORY", default_value_t = 65_536)]
    pub cancel_memory: usize,
    /// Fault injection for supervision tests: panic in the worker on the first delivery of every
    /// Nth message (0 = never). The message is handed back and redelivered.
    #[arg(long, env = "MILLRACE_FAULT_PANIC_EVERY", default_value_t = 0, hide = true)]
    pub fault_panic_every: u64,
}

/// The defaults (and any `MILLRACE_…` env overrides), as a service would start with no flags.
impl Default for BusSettings {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            bus: BusSettings,
        }
        <Only as clap::Parser>::parse_from(["millrace"]).bus
    }
}

impl BusSettings {
    pub fn storage(&self) -> StorageType {
        if self.stream_storage == "memory" { StorageType::Memory } else { StorageType::File }
    }
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_s)
    }
    /// An empty memory of cancel notices, bounded as configured.
    pub fn cancel_memory(&self) -> crate::CancelMemory {
        crate::CancelMemory::new(Duration::from_secs(self.cancel_remember_s), self.cancel_memory)
    }
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

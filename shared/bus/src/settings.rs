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
    /// Duplicate-detection window for Nats-Msg-Id, seconds. Unset: the retry horizon (see
    /// [`BusSettings::retry_horizon`]); set below it, start-up is refused.
    #[arg(long, env = "MILLRACE_DUPLICATE_WINDOW_S")]
    pub duplicate_window_s: Option<u64>,
    /// How long an accepted `Idempotency-Key` is remembered, seconds: a retry within it is the
    /// same request (answered DUPLICATE), also across broker restarts; after it, a new one.
    #[arg(long, env = "MILLRACE_IDEMPOTENCY_RETENTION_S", default_value_t = 24 * 3600)]
    pub idempotency_retention_s: u64,
    /// How long a request's decided terminal outcome is remembered, seconds; at least the
    /// duplicate window (start-up is refused otherwise).
    #[arg(long, env = "MILLRACE_OUTCOME_RETENTION_S", default_value_t = 3600)]
    pub outcome_retention_s: u64,
    /// Bytes the outcome ledger may hold; past it the oldest decisions are forgotten first.
    #[arg(long, env = "MILLRACE_OUTCOME_MAX_BYTES", default_value_t = 1 << 30)]
    pub outcome_max_bytes: i64,
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

/// Settings the bus refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "the duplicate window ({window:?}) is shorter than the retry horizon ({horizon:?} = the backoff of \
         every delivery up to --max-deliver, from --ack-wait-s, plus --publish-timeout-ms): raise \
         --duplicate-window-s or leave it unset to derive it"
    )]
    WindowBelowHorizon { window: Duration, horizon: Duration },
    #[error("--outcome-retention-s ({outcomes:?}) is shorter than the duplicate window ({window:?})")]
    OutcomesBelowWindow { outcomes: Duration, window: Duration },
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

    /// The ack wait of each delivery of a message: `ack_wait`, 2×, 4×, … (one per delivery).
    pub fn backoff(&self) -> Vec<Duration> {
        (0..self.max_deliver.clamp(1, 16)).map(|i| self.ack_wait() * 2u32.pow(i as u32)).collect()
    }

    /// The longest a message's work can be retried after its first delivery: every delivery's
    /// ack wait in turn, plus the last attempt's publish in flight. A stage's output can be
    /// published again (a redelivered input, a lost PubAck) until then, so the duplicate
    /// window must be at least this long. Explicit nak delays are shorter than the backoff
    /// step they replace (a second or less), so they do not lengthen it.
    pub fn retry_horizon(&self) -> Duration {
        self.backoff().into_iter().sum::<Duration>() + self.publish_timeout()
    }

    /// The duplicate window: as configured, else the retry horizon in whole seconds.
    pub fn duplicate_window(&self) -> Duration {
        match self.duplicate_window_s {
            Some(s) => Duration::from_secs(s),
            None => Duration::from_secs(self.retry_horizon().as_secs_f64().ceil() as u64),
        }
    }

    /// Refuses settings under which a retry could outlive the broker's or the ledger's memory
    /// of what it repeats.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let (window, horizon) = (self.duplicate_window(), self.retry_horizon());
        if window < horizon {
            return Err(SettingsError::WindowBelowHorizon { window, horizon });
        }
        let outcomes = Duration::from_secs(self.outcome_retention_s);
        if outcomes < window {
            return Err(SettingsError::OutcomesBelowWindow { outcomes, window });
        }
        Ok(())
    }
    /// An empty memory of cancel notices, bounded as configured.
    pub fn cancel_memory(&self) -> crate::CancelMemory {
        crate::CancelMemory::new(Duration::from_secs(self.cancel_remember_s), self.cancel_memory)
    }
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_window_is_the_retry_horizon() {
        let s = BusSettings::default();
        // 30 s ack wait, 5 deliveries: 30 + 60 + 120 + 240 + 480, plus the 5 s publish timeout.
        assert_eq!(s.retry_horizon(), Duration::from_secs(935));
        assert_eq!(s.duplicate_window(), Duration::from_secs(935));
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn a_window_shorter_than_the_horizon_is_refused() {
        let s = BusSettings { duplicate_window_s: Some(600), ..Default::default() };
        assert!(matches!(s.validate(), Err(SettingsError::WindowBelowHorizon { .. })));
        let s = BusSettings { duplicate_window_s: Some(600), max_deliver: 4, ..Default::default() };
        assert_eq!(s.validate(), Ok(()), "30 + 60 + 120 + 240 + 5 = 455 s fits");
        let s = BusSettings { outcome_retention_s: 60, ..Default::default() };
        assert!(matches!(s.validate(), Err(SettingsError::OutcomesBelowWindow { .. })));
    }
}

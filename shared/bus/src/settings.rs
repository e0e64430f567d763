//! Bus settings shared by every service (each flag also reads a `MILLRACE_…` env var).
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;

#[derive(Debug, Clone, clap::Args)]
pub struct BusSettings {
    /// NATS server URL, or several separated by commas (the nodes of a cluster:
    /// `nats://nats-0:4222,nats://nats-1:4222,nats://nats-2:4222`). The client tries them in a
    /// random order, connects to the first that answers and, when that connection drops,
    /// reconnects to any of them. async-nats takes one URL per string, so the list is split
    /// here ([`BusSettings::nats_servers`]); each entry is `nats://host:port`, `host:port` or
    /// `host` (port 4222).
    #[arg(long, env = "MILLRACE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Stream storage: file (durable) or memory.
    #[arg(long, env = "MILLRACE_STREAM_STORAGE", default_value = "file", value_parser = ["file", "memory"])]
    pub stream_storage: String,
    /// Replicas of every stream the mesh creates (the edges, the dead-letter stream), of the
    /// ledger's buckets and of session's bucket: 1 on a single server, 3 on a three-node
    /// JetStream cluster so losing one node loses no acknowledged message. Consumers follow
    /// their stream. Provisioning brings an existing stream to this count; 1..=5.
    #[arg(long, env = "MILLRACE_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
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
    #[error("--stream-replicas ({0}) must be 1 to 5 (JetStream's limit; 3 for a three-node cluster)")]
    Replicas(usize),
    #[error("--nats-url: {entry:?} in {list:?} is not a NATS URL: {reason}")]
    NatsUrl { list: String, entry: String, reason: String },
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
        if !(1..=5).contains(&self.stream_replicas) {
            return Err(SettingsError::Replicas(self.stream_replicas));
        }
        self.nats_servers()?;
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
    /// The servers of `--nats-url`: each comma-separated entry, trimmed (empty ones skipped).
    pub fn nats_servers(&self) -> Result<Vec<async_nats::ServerAddr>, SettingsError> {
        parse_servers(&self.nats_url)
    }

    /// An empty memory of cancel notices, bounded as configured.
    pub fn cancel_memory(&self) -> crate::CancelMemory {
        crate::CancelMemory::new(Duration::from_secs(self.cancel_remember_s), self.cancel_memory)
    }
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

/// The servers of a comma-separated list of NATS URLs; an empty list is refused.
pub fn parse_servers(list: &str) -> Result<Vec<async_nats::ServerAddr>, SettingsError> {
    let refuse =
        |entry: &str, reason: String| SettingsError::NatsUrl { list: list.to_owned(), entry: entry.to_owned(), reason };
    let servers = list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| entry.parse::<async_nats::ServerAddr>().map_err(|e| refuse(entry, e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(refuse(list, "no URL".to_owned()));
    }
    Ok(servers)
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

    #[test]
    fn replicas_outside_one_to_five_are_refused() {
        assert_eq!(BusSettings::default().stream_replicas, 1);
        for ok in 1..=5 {
            assert_eq!(BusSettings { stream_replicas: ok, ..Default::default() }.validate(), Ok(()));
        }
        for bad in [0, 6, 7] {
            let s = BusSettings { stream_replicas: bad, ..Default::default() };
            assert_eq!(s.validate(), Err(SettingsError::Replicas(bad)));
        }
    }

    #[test]
    fn a_comma_separated_url_list_is_every_server_in_order() {
        let s = BusSettings { nats_url: "nats://a:4222, b:4223 ,c,".into(), ..Default::default() };
        let hosts: Vec<(String, u16)> =
            s.nats_servers().unwrap().iter().map(|a| (a.host().to_owned(), a.port())).collect();
        assert_eq!(hosts, [("a".into(), 4222), ("b".into(), 4223), ("c".into(), 4222)]);
        assert_eq!(BusSettings::default().nats_servers().unwrap().len(), 1);
        for bad in ["", " , ", "http://a:4222", "nats://a:4222,nats://b:notaport"] {
            let s = BusSettings { nats_url: bad.into(), ..Default::default() };
            assert!(matches!(s.validate(), Err(SettingsError::NatsUrl { .. })), "{bad:?} is refused");
        }
    }
}

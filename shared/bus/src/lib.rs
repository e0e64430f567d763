//! The Millrace bus: JetStream plumbing shared by every service.
//!
//! - [`topology`]: the declarative stream/consumer layout, provisioned idempotently.
//! - [`publisher`]: deduplicating publishes (`Nats-Msg-Id = <request_id>/<stage>`) whose PubAcks
//!   are pipelined through a bounded window.
//! - [`consumer`]: a durable pull consumer feeding a bounded worker pool, acking after the effect.
//! - [`ledger`]: what is decided once per request and survives broker restarts (accepted
//!   idempotency keys, terminal outcomes, published completions).
//! - [`dlq`]: dead-lettering of poison messages and of max-deliveries advisories.
//! - [`trace`]: W3C trace context in message headers.

pub mod cancels;
pub mod consumer;
pub mod delivery;
pub mod dlq;
pub mod lag;
pub mod ledger;
pub mod metrics;
pub mod outbound;
pub mod publisher;
pub mod settings;
pub mod topology;
pub mod trace;

use std::time::Duration;

pub use cancels::{CancelMemory, follow_cancels};
pub use consumer::{AckHandle, DeferringHandler, Handler, StageConsumer};
pub use delivery::{Delivery, StageError, require_request};
pub use ledger::Ledger;
pub use outbound::{Dedup, terminal_result};
pub use publisher::{Outbound, Published, Publisher};
pub use settings::{BusSettings, SettingsError};
pub use topology::{ConsumerSpec, Edge, EdgeKey, Topology};

/// The NATS client's own error, kept as the source of a [`BusError`].
pub type NatsError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors at the bus boundary, classified by what the caller should do about them. Each keeps
/// the client's error (when there is one) as its source; the message names the operation and,
/// for logs that print only the message, repeats the source's text.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The stream refused the message because it is at its limits (discard-new): back off.
    #[error("stream full: {context}{}", cause(source))]
    StreamFull { context: String, source: Option<NatsError> },
    /// NATS cannot be reached or did not answer in time.
    #[error("NATS unavailable: {context}{}", cause(source))]
    Unavailable { context: String, source: Option<NatsError> },
    /// The topology could not be provisioned (conflicting existing config, bad settings).
    #[error("provisioning {context}{}", cause(source))]
    Provision { context: String, source: Option<NatsError> },
    #[error("{context}{}", cause(source))]
    Other { context: String, source: Option<NatsError> },
}

fn cause(source: &Option<NatsError>) -> String {
    source.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

impl BusError {
    /// NATS failed at `context` with the client's error `source`.
    pub fn unavailable(context: impl Into<String>, source: impl Into<NatsError>) -> Self {
        Self::Unavailable { context: context.into(), source: Some(source.into()) }
    }

    /// NATS is unavailable at `context` with no client error to name (a subscription ended).
    pub fn gone(context: impl Into<String>) -> Self {
        Self::Unavailable { context: context.into(), source: None }
    }

    pub fn provision(context: impl Into<String>, source: impl Into<NatsError>) -> Self {
        Self::Provision { context: context.into(), source: Some(source.into()) }
    }
}

/// Connects to NATS with reconnects on, returning the client. `url` is one NATS URL or several
/// separated by commas (the nodes of a cluster): async-nats parses a string as a single URL, so
/// the list is split here and handed over as a list of servers; the client tries them in a
/// random order until one answers, and reconnects to any of them later.
pub async fn connect(url: &str, name: &str, timeout: Duration) -> Result<async_nats::Client, BusError> {
    let servers = settings::parse_servers(url)
        .map_err(|e| BusError::Provision { context: format!("settings: {e}"), source: None })?;
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout)
        .max_reconnects(None)
        .connect(servers)
        .await
        .map_err(|e| BusError::unavailable(format!("connect {url}"), e))
}

/// Checks the settings, connects and provisions the mesh topology and the ledger
/// (idempotent): what every service does first.
pub async fn connect_mesh(settings: &BusSettings, name: &str) -> Result<Publisher, BusError> {
    settings.validate().map_err(|e| BusError::Provision { context: format!("settings: {e}"), source: None })?;
    let client = connect(&settings.nats_url, name, Duration::from_secs(5)).await?;
    let publisher = Publisher::new(client, settings).await?;
    Topology::mesh(settings).provision(publisher.jetstream()).await?;
    Ok(publisher)
}

/// The request id inside a `Nats-Msg-Id` of the form `<request_id>/<stage>`.
pub fn request_id_from_msg_id(msg_id: &str) -> Option<&str> {
    msg_id.rsplit_once('/').map(|(rid, _)| rid).filter(|rid| !rid.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_id_round_trips_request_id() {
        let id = Dedup::Stage("ingest").msg_id("0190-abc");
        assert_eq!(id, "0190-abc/ingest");
        assert_eq!(request_id_from_msg_id(&id), Some("0190-abc"));
        assert_eq!(request_id_from_msg_id("no-stage"), None);
        assert_eq!(request_id_from_msg_id("/stage"), None);
    }
}

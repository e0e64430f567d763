//! Deduplicating JetStream publishes whose PubAcks are pipelined.
//!
//! `send` writes the message and returns at once with a future for its PubAck; up to
//! `publish_window` PubAcks are outstanding per process (a semaphore permit rides with each
//! pending ack), so a burst of publishes costs about one round trip, not one each.
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{HeaderMap, connection::State};
use bytes::Bytes;
use futures::future::try_join_all;
use tokio::sync::Semaphore;

use millrace_proto::Message as _;
use millrace_proto::v1::Result as TerminalResult;

use crate::ledger::Ledger;
use crate::topology::Edge;
use crate::{BusError, BusSettings, NatsError, metrics, trace};

/// The stream's acknowledgement of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub stream: String,
    pub sequence: u64,
    /// The stream already held a message with this `Nats-Msg-Id` and dropped this one.
    pub duplicate: bool,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub subject: String,
    /// `Nats-Msg-Id`, normally `<request_id>/<stage>`.
    pub msg_id: String,
    pub payload: Bytes,
}

#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    window: Arc<Semaphore>,
    timeout: Duration,
    ledger: Ledger,
}

impl Publisher {
    /// A publisher on `client`; `ledger` decides what it publishes on RESULTS.
    pub async fn new(client: async_nats::Client, settings: &BusSettings) -> Result<Self, BusError> {
        let js = jetstream::ContextBuilder::new().timeout(settings.publish_timeout()).build(client);
        let ledger = Ledger::open(&js, settings).await?;
        // Shown at 0, so the first failure is an increase Prometheus sees.
        for kind in publish_error::ALL {
            metrics::PUBLISH_ERRORS.with_label_values(&[kind]);
        }
        Ok(Self {
            js,
            window: Arc::new(Semaphore::new(settings.publish_window.max(1))),
            timeout: settings.publish_timeout(),
            ledger,
        })
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The durable decisions (accepted idempotency keys, outcomes, published completions).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// Writes the message and returns a future for its PubAck. Fails fast with
    /// [`BusError::Unavailable`] while the connection is down instead of queueing behind it.
    ///
    /// A message bound for RESULTS is a request's terminal result: the ledger decides it first,
    /// and what goes out is the decided result, which is this one only if no other was decided
    /// before (the one rule that keeps every reader of RESULTS on a single outcome).
    pub async fn send(
        &self,
        mut out: Outbound,
    ) -> Result<impl Future<Output = Result<Published, BusError>> + Send + 'static, BusError> {
        if self.js.client().connection_state() != State::Connected {
            metrics::PUBLISH_ERRORS.with_label_values(&[publish_error::UNAVAILABLE]).inc();
            return Err(BusError::gone("not connected to NATS"));
        }
        if let Some(request_id) = Edge::RESULTS.key_of(&out.subject) {
            // Only a readable result may become the outcome every reader follows.
            let proposed = TerminalResult::decode(out.payload.as_ref()).map_err(|e| BusError::Other {
                context: format!("refusing an undecodable terminal result for {request_id}"),
                source: Some(e.into()),
            })?;
            let decision = self.ledger.decide(request_id, out.payload).await?;
            // A stage retrying its own outcome (a lost PubAck, a redelivery) is not overruled.
            let overruled = !decision.first
                && TerminalResult::decode(decision.payload.as_ref())
                    .is_ok_and(|d| (d.status, d.stage) != (proposed.status, proposed.stage));
            if overruled {
                metrics::OUTCOMES_OVERRULED.inc();
            }
            out.payload = decision.payload;
        }
        let permit = tokio::time::timeout(self.timeout, self.window.clone().acquire_owned())
            .await
            .map_err(|_| BusError::gone("publish window full: PubAcks are not arriving"))?
            .expect("the window semaphore is never closed");
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, out.msg_id.as_str());
        trace::inject_current(&mut headers);
        let started = Instant::now();
        let ack = self.js.publish_with_headers(out.subject, headers, out.payload).await.map_err(map_publish_error)?;
        // The PubAck is awaited by its own task so the window slot frees when the ack arrives,
        // whether or not the caller has polled for it yet.
        let resolved = tokio::spawn(async move {
            let ack = ack.await.map_err(map_publish_error);
            drop(permit);
            let ack = ack?;
            metrics::PUBLISH_LATENCY.with_label_values(&[&ack.stream]).observe(started.elapsed().as_secs_f64());
            // Both counted (one by 0), so a stream's duplicates show at 0 from its first publish.
            metrics::DUPLICATES.with_label_values(&[&ack.stream]).inc_by(u64::from(ack.duplicate));
            metrics::MESSAGES_OUT.with_label_values(&[&ack.stream]).inc_by(u64::from(!ack.duplicate));
            Ok(Published { stream: ack.stream, sequence: ack.sequence, duplicate: ack.duplicate })
        });
        Ok(async move {
            resolved.await.map_err(|e| BusError::Other { context: "PubAck task".into(), source: Some(e.into()) })?
        })
    }

    /// Publishes one message and waits for its PubAck.
    pub async fn publish(&self, out: Outbound) -> Result<Published, BusError> {
        self.send(out).await?.await
    }

    /// Publishes the request's decided outcome again, if one is decided, and says whether one
    /// is. The ledger decides before RESULTS is written, so a stage that decided and then lost
    /// its publish (a stream leader killed before the PubAck) leaves a decision no reader has
    /// seen; a stage meeting a decided request on redelivery must therefore publish it, not just
    /// skip it. The outcome's dedup id drops the copy when RESULTS holds it already.
    pub async fn republish_outcome(&self, request_id: &str) -> Result<bool, BusError> {
        let Some(payload) = self.ledger.outcome(request_id).await? else {
            return Ok(false);
        };
        let decided = TerminalResult::decode(payload.as_ref()).map_err(|e| BusError::Other {
            context: format!("the decided outcome of {request_id} is unreadable"),
            source: Some(e.into()),
        })?;
        self.publish(Outbound::terminal(&decided)).await?;
        Ok(true)
    }

    /// Sends every message, then awaits all PubAcks together.
    pub async fn publish_all(&self, outs: impl IntoIterator<Item = Outbound>) -> Result<Vec<Published>, BusError> {
        let mut pending = Vec::new();
        for out in outs {
            pending.push(self.send(out).await?);
        }
        try_join_all(pending).await
    }
}

/// The `kind` label of `millrace_publish_errors_total`.
mod publish_error {
    pub const UNAVAILABLE: &str = "unavailable";
    pub const NO_STREAM: &str = "no_stream";
    pub const STREAM_FULL: &str = "stream_full";
    pub const OTHER: &str = "other";
    pub const ALL: [&str; 4] = [UNAVAILABLE, NO_STREAM, STREAM_FULL, OTHER];
}

fn map_publish_error(e: jetstream::context::PublishError) -> BusError {
    let (kind, variant): (_, fn(String, Option<NatsError>) -> BusError) = match e.kind() {
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            (publish_error::UNAVAILABLE, |context, source| BusError::Unavailable { context, source })
        }
        PublishErrorKind::StreamNotFound => {
            (publish_error::NO_STREAM, |context, source| BusError::Unavailable { context, source })
        }
        _ if is_stream_full(&e) => {
            (publish_error::STREAM_FULL, |context, source| BusError::StreamFull { context, source })
        }
        _ => (publish_error::OTHER, |context, source| BusError::Other { context, source }),
    };
    metrics::PUBLISH_ERRORS.with_label_values(&[kind]).inc();
    variant("publish".into(), Some(e.into()))
}

/// A discard-new refusal: the stream's store refused the message (`maximum messages / bytes
/// exceeded`, JetStream error 10077) or the account's storage is used up (10047). Told by the
/// server's error code, not by its text.
fn is_stream_full(e: &jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    e.source().and_then(|s| s.downcast_ref::<jetstream::Error>()).is_some_and(|j| {
        matches!(
            j.error_code(),
            jetstream::ErrorCode::STREAM_STORE_FAILED | jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED
        )
    })
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    use super::*;

    fn refused(err_code: u64) -> PublishError {
        let error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 503, "err_code": err_code, "description": "maximum messages exceeded"
        }))
        .unwrap();
        PublishError::with_source(PublishErrorKind::Other, error)
    }

    #[test]
    fn discard_new_refusals_are_told_by_their_error_code() {
        assert!(matches!(map_publish_error(refused(10077)), BusError::StreamFull { .. }));
        assert!(matches!(map_publish_error(refused(10047)), BusError::StreamFull { .. }));
        assert!(matches!(map_publish_error(refused(10071)), BusError::Other { .. }));
        assert!(matches!(
            map_publish_error(PublishError::new(PublishErrorKind::TimedOut)),
            BusError::Unavailable { .. }
        ));
        let full = map_publish_error(refused(10077));
        assert!(std::error::Error::source(&full).is_some(), "the client's error is kept as the source");
    }
}

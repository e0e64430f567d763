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

use crate::{BusError, BusSettings, metrics, trace};

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
}

impl Publisher {
    pub fn new(client: async_nats::Client, settings: &BusSettings) -> Self {
        let js = jetstream::ContextBuilder::new().timeout(settings.publish_timeout()).build(client);
        Self {
            js,
            window: Arc::new(Semaphore::new(settings.publish_window.max(1))),
            timeout: settings.publish_timeout(),
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// Writes the message and returns a future for its PubAck. Fails fast with
    /// [`BusError::Unavailable`] while the connection is down instead of queueing behind it.
    pub async fn send(
        &self,
        out: Outbound,
    ) -> Result<impl Future<Output = Result<Published, BusError>> + Send + 'static, BusError> {
        if self.js.client().connection_state() != State::Connected {
            metrics::PUBLISH_ERRORS.with_label_values(&["unavailable"]).inc();
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        let permit = tokio::time::timeout(self.timeout, self.window.clone().acquire_owned())
            .await
            .map_err(|_| BusError::Unavailable("publish window full: PubAcks are not arriving".into()))?
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
            if ack.duplicate {
                metrics::DUPLICATES.with_label_values(&[&ack.stream]).inc();
            } else {
                metrics::MESSAGES_OUT.with_label_values(&[&ack.stream]).inc();
            }
            Ok(Published { stream: ack.stream, sequence: ack.sequence, duplicate: ack.duplicate })
        });
        Ok(async move { resolved.await.map_err(|e| BusError::Other(format!("PubAck task: {e}")))? })
    }

    /// Publishes one message and waits for its PubAck.
    pub async fn publish(&self, out: Outbound) -> Result<Published, BusError> {
        self.send(out).await?.await
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

fn map_publish_error(e: jetstream::context::PublishError) -> BusError {
    let text = e.to_string();
    let (kind, err) = match e.kind() {
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => ("unavailable", BusError::Unavailable(text)),
        PublishErrorKind::StreamNotFound => ("no_stream", BusError::Unavailable(text)),
        // discard-new refusals: "maximum messages exceeded" / "maximum bytes exceeded".
        _ if is_stream_full(&text) => ("stream_full", BusError::StreamFull(text)),
        _ => ("other", BusError::Other(text)),
    };
    metrics::PUBLISH_ERRORS.with_label_values(&[kind]).inc();
    err
}

fn is_stream_full(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("maximum messages") || t.contains("maximum bytes") || t.contains("resource limits")
}

#[cfg(test)]
mod tests {
    #[test]
    fn discard_new_refusals_are_stream_full() {
        assert!(super::is_stream_full("publish failed: maximum messages exceeded (10077)"));
        assert!(super::is_stream_full("maximum bytes exceeded"));
        assert!(!super::is_stream_full("wrong last sequence"));
    }
}

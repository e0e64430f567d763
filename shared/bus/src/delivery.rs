//! What a stage's handler is given and what it answers: one delivered message, and why it could
//! not be handled (which decides whether it is retried or dead-lettered).
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use millrace_proto::v1::{Envelope, RequestContext, TerminalStatus};
use millrace_proto::{Message as _, now_unix_us};

use crate::{BusError, request_id_from_msg_id};

/// One delivered message, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    /// `Nats-Msg-Id` of the message, when it has one.
    pub msg_id: Option<String>,
    pub stream: String,
    pub stream_sequence: u64,
    /// 1 on first delivery.
    pub deliveries: u64,
    /// When this stage received it, for its timing record.
    pub received_unix_us: i64,
}

impl Delivery {
    /// The request this message belongs to: from its dedup id, or failing that its payload.
    pub fn request_id(&self) -> Option<String> {
        self.msg_id
            .as_deref()
            .and_then(request_id_from_msg_id)
            .map(str::to_owned)
            .or_else(|| self.context().map(|c| c.request_id).filter(|id| !id.is_empty()))
    }

    /// The request context, read from field 1 whatever the payload's type (see `Envelope`).
    pub fn context(&self) -> Option<RequestContext> {
        Envelope::decode(self.payload.as_ref()).ok().and_then(|e| e.ctx)
    }

    /// Decodes the payload, mapping failure to a permanent `undecodable_payload` error.
    pub fn decode<M: millrace_proto::Message + Default>(&self) -> Result<M, StageError> {
        M::decode(self.payload.as_ref())
            .map_err(|e| StageError::poison(TerminalStatus::Failed, "undecodable_payload", e.to_string(), None))
    }
}

/// Why a message could not be handled, and so what happens to it.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// It may work later: nak with this delay (the stream redelivers it).
    #[error("transient: {detail}")]
    Transient { detail: String, delay: Duration },
    /// The next edge's stream is full: the work is sound but must wait for room. Its handler
    /// is run again after `delay` while the message is held (in-progress acks), so a long
    /// downstream outage does not use up the message's deliveries and dead-letter it.
    #[error("backpressure: {detail}")]
    Backpressure { detail: String, delay: Duration },
    /// It can never work: DLQ record + terminal result, then term.
    #[error("permanent ({reason}): {detail}")]
    /// `ctx` is boxed: a request context is large, and results carry this error often.
    Permanent { status: TerminalStatus, reason: String, detail: String, ctx: Option<Box<RequestContext>> },
}

impl StageError {
    pub fn transient(detail: impl Into<String>, delay: Duration) -> Self {
        Self::Transient { detail: detail.into(), delay }
    }

    pub fn poison(
        status: TerminalStatus,
        reason: impl Into<String>,
        detail: impl Into<String>,
        ctx: Option<RequestContext>,
    ) -> Self {
        Self::Permanent { status, reason: reason.into(), detail: detail.into(), ctx: ctx.map(Box::new) }
    }
}

/// The request context of a decoded message, which must name its request: a message that does
/// not can never be answered, so it is poison (`missing_request_id`).
pub fn require_request(ctx: Option<&RequestContext>) -> Result<&RequestContext, StageError> {
    ctx.filter(|c| !c.request_id.is_empty()).ok_or_else(|| {
        StageError::poison(TerminalStatus::Failed, "missing_request_id", "the message names no request", None)
    })
}

impl From<BusError> for StageError {
    /// A publish that failed is worth retrying: the stream may be full or NATS reconnecting.
    fn from(e: BusError) -> Self {
        match e {
            BusError::StreamFull { .. } => Self::Backpressure { detail: e.to_string(), delay: Duration::from_secs(1) },
            _ => Self::transient(e.to_string(), Duration::from_millis(500)),
        }
    }
}

impl Delivery {
    /// The delivery of a pulled message, stamped with when this stage received it.
    pub(crate) fn of(message: &jetstream::Message) -> Self {
        let info = message.info().ok();
        Self {
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            headers: message.headers.clone(),
            msg_id: message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_owned()),
            stream: info.as_ref().map(|i| i.stream.to_owned()).unwrap_or_default(),
            stream_sequence: info.as_ref().map(|i| i.stream_sequence).unwrap_or_default(),
            deliveries: info.as_ref().map(|i| i.delivered.max(1) as u64).unwrap_or(1),
            received_unix_us: now_unix_us(),
        }
    }
}

//! Dead-lettering: a message that can never be processed becomes a DLQ record plus a terminal
//! result for its request, so the request still ends in exactly one terminal row.
use async_nats::jetstream;
use futures::StreamExt;
use millrace_proto::v1::{DlqRecord, RequestContext, Result as TerminalResult, TerminalStatus, Timings};
use millrace_proto::{Message as _, now_unix_ms, now_unix_us};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::consumer::Delivery;
use crate::publisher::Outbound;
use crate::topology::{ConsumerSpec, Edge};
use crate::{BusError, Publisher, metrics, msg_id};

/// Publishes the DLQ record and the terminal result of `delivery`'s request (pipelined, both
/// deduplicated, so a retry after a crash adds nothing).
pub async fn dead_letter(
    publisher: &Publisher,
    stage: &str,
    delivery: &Delivery,
    status: TerminalStatus,
    reason: &str,
    detail: &str,
    ctx: Option<RequestContext>,
) -> Result<(), BusError> {
    let ctx = ctx.or_else(|| delivery.context());
    // A message whose request cannot be told still gets a row, keyed by where it sat.
    let request_id = delivery
        .request_id()
        .unwrap_or_else(|| format!("unknown-{}-{}", delivery.stream, delivery.stream_sequence));
    let mut ctx = ctx.unwrap_or_default();
    if ctx.request_id.is_empty() {
        ctx.request_id = request_id.clone();
    }
    let record = DlqRecord {
        stage: stage.to_owned(),
        stream: delivery.stream.clone(),
        subject: delivery.subject.clone(),
        stream_sequence: delivery.stream_sequence,
        deliveries: delivery.deliveries,
        reason: reason.to_owned(),
        detail: detail.to_owned(),
        payload: delivery.payload.to_vec(),
        request_id: request_id.clone(),
        failed_unix_ms: now_unix_ms(),
        ctx: Some(ctx.clone()),
    };
    let mut timings = Timings::default();
    timings.record(stage, delivery.received_unix_us);
    let result = TerminalResult {
        ctx: Some(ctx),
        timings: Some(timings),
        status: status as i32,
        reason: reason.to_owned(),
        detail: detail.to_owned(),
        stage: stage.to_owned(),
        ..Default::default()
    };
    publisher
        .publish_all([
            Outbound {
                subject: Edge::DLQ.subject_for(stage),
                msg_id: msg_id(&request_id, &format!("dlq.{stage}")),
                payload: record.encode_to_vec().into(),
            },
            Outbound {
                subject: Edge::RESULTS.subject_for(&request_id),
                msg_id: msg_id(&request_id, &format!("{stage}.dead")),
                payload: result.encode_to_vec().into(),
            },
        ])
        .await?;
    metrics::DLQ.with_label_values(&[stage, reason]).inc();
    Ok(())
}

/// The server's advisory when a message used up its deliveries on a consumer.
#[derive(Debug, Deserialize)]
struct MaxDeliveriesAdvisory {
    stream: String,
    stream_seq: u64,
    deliveries: u64,
}

/// Dead-letters messages that exhausted `max_deliver` on one consumer.
pub struct MaxDeliveriesListener {
    stage: &'static str,
    spec: ConsumerSpec,
    publisher: Publisher,
}

impl MaxDeliveriesListener {
    pub fn new(stage: &'static str, spec: ConsumerSpec, publisher: Publisher) -> Self {
        Self { stage, spec, publisher }
    }

    pub fn subject(spec: &ConsumerSpec) -> String {
        format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}", spec.edge.stream, spec.durable)
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BusError> {
        let client = self.publisher.client();
        let mut advisories = client
            .subscribe(Self::subject(&self.spec))
            .await
            .map_err(|e| BusError::Unavailable(format!("advisory subscription: {e}")))?;
        loop {
            let advisory = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                a = advisories.next() => match a {
                    Some(a) => a,
                    None => return Err(BusError::Unavailable("advisory subscription closed".into())),
                },
            };
            match serde_json::from_slice::<MaxDeliveriesAdvisory>(&advisory.payload) {
                Ok(a) => {
                    if let Err(e) = self.dead_letter(&a).await {
                        warn!(stage = self.stage, seq = a.stream_seq, error = %e, "dead-lettering an exhausted message failed");
                    }
                }
                Err(e) => warn!(stage = self.stage, error = %e, "unreadable max-deliveries advisory"),
            }
        }
    }

    async fn dead_letter(&self, advisory: &MaxDeliveriesAdvisory) -> Result<(), BusError> {
        let js: &jetstream::Context = self.publisher.jetstream();
        let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(e.to_string());
        let stream = js.get_stream(&advisory.stream).await.map_err(|e| unavailable(&e))?;
        let message = stream.get_raw_message(advisory.stream_seq).await.map_err(|e| unavailable(&e))?;
        let delivery = Delivery {
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            msg_id: message
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned()),
            headers: Some(message.headers),
            stream: advisory.stream.clone(),
            stream_sequence: advisory.stream_seq,
            deliveries: advisory.deliveries,
            received_unix_us: now_unix_us(),
        };
        let detail = format!("gave up after {} deliveries", advisory.deliveries);
        info!(stage = self.stage, seq = advisory.stream_seq, %detail, "dead-lettering");
        dead_letter(&self.publisher, self.stage, &delivery, TerminalStatus::Failed, "max_deliveries", &detail, None).await
    }
}

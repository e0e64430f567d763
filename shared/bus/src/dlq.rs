//! Dead-lettering: a message that can never be processed becomes a DLQ record plus a terminal
//! result for its request, so the request still ends in exactly one terminal row.
use async_nats::jetstream;
use futures::StreamExt;
use millrace_proto::v1::{Batch, DlqRecord, RequestContext, TerminalStatus, Timings};
use millrace_proto::{Message as _, now_unix_ms, now_unix_us};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::delivery::Delivery;
use crate::outbound::{Dedup, terminal_result};
use crate::publisher::Outbound;
use crate::topology::{ConsumerSpec, Edge};
use crate::{BusError, Publisher, metrics};

/// The reason of a dead letter whose message ran out of deliveries.
pub const MAX_DELIVERIES: &str = "max_deliveries";

/// Publishes the DLQ record of `delivery` and a terminal result for every request it stands
/// for (pipelined, all deduplicated, so a retry after a crash adds nothing): its own request,
/// or — for a batch — each member, so no accepted request is left without a terminal row.
pub async fn dead_letter(
    publisher: &Publisher,
    stage: &str,
    delivery: &Delivery,
    status: TerminalStatus,
    reason: &str,
    detail: &str,
    ctx: Option<RequestContext>,
) -> Result<(), BusError> {
    // A message whose request cannot be told still gets a row, keyed by where it sat.
    let message_id =
        delivery.request_id().unwrap_or_else(|| format!("unknown-{}-{}", delivery.stream, delivery.stream_sequence));
    let members = batch_members(delivery);
    let own = (members.is_empty()).then(|| {
        let mut ctx = ctx.or_else(|| delivery.context()).unwrap_or_default();
        if ctx.request_id.is_empty() {
            ctx.request_id = message_id.clone();
        }
        ctx
    });
    let record = DlqRecord {
        stage: stage.to_owned(),
        stream: delivery.stream.clone(),
        subject: delivery.subject.clone(),
        stream_sequence: delivery.stream_sequence,
        deliveries: delivery.deliveries,
        reason: reason.to_owned(),
        detail: detail.to_owned(),
        payload: delivery.payload.to_vec(),
        request_id: message_id.clone(),
        failed_unix_ms: now_unix_ms(),
        // Set only when the message is one request's: the sink then records its FAILED row.
        ctx: own.clone(),
    };
    let mut timings = Timings::default();
    timings.record(stage, delivery.received_unix_us);
    let mut outbound = vec![Outbound {
        subject: Edge::DLQ.subject_for(stage),
        msg_id: Dedup::DeadLetter(stage).msg_id(&message_id),
        payload: record.encode_to_vec().into(),
    }];
    for ctx in own.into_iter().chain(members) {
        let result = terminal_result(stage, Some(ctx), Some(timings.clone()), status, reason, detail);
        outbound.push(Outbound::terminal(&result));
    }
    publisher.publish_all(outbound).await?;
    metrics::DLQ.with_label_values(&[stage, reason]).inc();
    Ok(())
}

/// The requests of a message on the BATCHES edge (empty for any other edge, or a batch that
/// does not decode: then the batch itself is all that can be named).
fn batch_members(delivery: &Delivery) -> Vec<RequestContext> {
    if delivery.stream != Edge::BATCHES.stream {
        return Vec::new();
    }
    Batch::decode(delivery.payload.as_ref())
        .map(|b| b.prompts.into_iter().filter_map(|p| p.ctx).filter(|c| !c.request_id.is_empty()).collect())
        .unwrap_or_default()
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
    /// The consumer's durable name, which is its stage's name.
    stage: &'static str,
    spec: ConsumerSpec,
    publisher: Publisher,
}

impl MaxDeliveriesListener {
    pub fn new(spec: ConsumerSpec, publisher: Publisher) -> Self {
        Self { stage: spec.durable, spec, publisher }
    }

    pub fn subject(spec: &ConsumerSpec) -> String {
        format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}", spec.edge.stream, spec.durable)
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BusError> {
        let client = self.publisher.client();
        let mut advisories = client
            .subscribe(Self::subject(&self.spec))
            .await
            .map_err(|e| BusError::unavailable("advisory subscription", e))?;
        loop {
            let advisory = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                a = advisories.next() => match a {
                    Some(a) => a,
                    None => return Err(BusError::gone("advisory subscription closed")),
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
        let context = || format!("reading {} #{}", advisory.stream, advisory.stream_seq);
        let stream = js.get_stream(&advisory.stream).await.map_err(|e| BusError::unavailable(context(), e))?;
        let message =
            stream.get_raw_message(advisory.stream_seq).await.map_err(|e| BusError::unavailable(context(), e))?;
        let delivery = Delivery {
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            msg_id: message.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.as_str().to_owned()),
            headers: Some(message.headers),
            stream: advisory.stream.clone(),
            stream_sequence: advisory.stream_seq,
            deliveries: advisory.deliveries,
            received_unix_us: now_unix_us(),
        };
        let detail = format!("gave up after {} deliveries", advisory.deliveries);
        info!(stage = self.stage, seq = advisory.stream_seq, %detail, "dead-lettering");
        dead_letter(&self.publisher, self.stage, &delivery, TerminalStatus::Failed, MAX_DELIVERIES, &detail, None).await
    }
}

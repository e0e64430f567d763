//! A stage's durable pull consumer: messages feed a bounded pool of workers; each message is
//! acked only after its effect, naked with a delay on transient errors, kept alive with
//! in-progress acks while it runs long, and dead-lettered then termed when it can never succeed.
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use millrace_proto::v1::{Envelope, RequestContext, TerminalStatus};
use millrace_proto::{Message as _, now_unix_us};
use prometheus::IntCounterVec;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::topology::{self, ConsumerSpec};
use crate::{BusError, BusSettings, Publisher, dlq, metrics, request_id_from_msg_id, trace};

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
    /// It can never work: DLQ record + terminal result, then term.
    #[error("permanent ({reason}): {detail}")]
    Permanent { status: TerminalStatus, reason: String, detail: String, ctx: Option<RequestContext> },
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
        Self::Permanent { status, reason: reason.into(), detail: detail.into(), ctx }
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
        let delay = match e {
            BusError::StreamFull(_) => Duration::from_secs(2),
            _ => Duration::from_millis(500),
        };
        Self::transient(e.to_string(), delay)
    }
}

/// A stage's logic for one message. The effect (publish with PubAck, commit) must be complete
/// when the future resolves `Ok`: the message is acked right after.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Result<(), StageError>> + Send;
}

/// Pulls one durable consumer and runs a [`Handler`] on up to `workers` messages at once.
pub struct StageConsumer<H> {
    pub stage: &'static str,
    pub spec: ConsumerSpec,
    pub handler: Arc<H>,
    pub publisher: Publisher,
    pub settings: BusSettings,
}

impl<H: Handler> StageConsumer<H> {
    pub fn new(
        stage: &'static str,
        spec: ConsumerSpec,
        handler: Arc<H>,
        publisher: Publisher,
        settings: BusSettings,
    ) -> Self {
        Self { stage, spec, handler, publisher, settings }
    }

    /// Runs until `shutdown`, then drains: stops pulling, hands back messages it has not
    /// started, and waits for the running ones (whose publishes complete before their acks).
    /// A panic in a handler naks that message and then propagates, so the supervisor restarts
    /// this consumer.
    pub async fn run(&self, shutdown: CancellationToken, on_ready: impl Fn()) -> Result<(), BusError> {
        let js = self.publisher.jetstream().clone();
        let unavailable =
            |e: &dyn std::fmt::Display| BusError::Unavailable(format!("consumer {}: {e}", self.spec.durable));
        let stream = js.get_stream(self.spec.edge.stream).await.map_err(|e| unavailable(&e))?;
        // The reader owns its consumer's settings: create-or-update to this process's flags.
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(topology::consumer_config(&self.settings, self.spec.durable))
            .await
            .map_err(|e| unavailable(&e))?;
        let workers = self.settings.workers.max(1);
        // A pull of one message only re-pulls once it is fully consumed, and then at times not
        // until the pull expired (seen: 35 s stalls with one worker): pull at least two, and
        // let pulls expire soon so any lost one costs seconds, not half a minute.
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(workers.max(2))
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| unavailable(&e))?;
        let advisories = dlq::MaxDeliveriesListener::new(self.stage, self.spec, self.publisher.clone());
        let mut advisories = std::pin::pin!(advisories.run(shutdown.clone()));
        let slots = Arc::new(Semaphore::new(workers));
        let mut running = JoinSet::new();
        let mut delivered = 0u64;
        info!(stage = self.stage, consumer = self.spec.durable, workers, "consuming");
        on_ready();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = running.join_next(), if !running.is_empty() => propagate_panic(done),
                r = &mut advisories => r?,
                slot = slots.clone().acquire_owned() => {
                    let slot = slot.expect("worker slots are never closed");
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        next = messages.next() => next,
                    };
                    let message = match next {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            // Heartbeat misses and pull errors: the stream re-issues pulls itself.
                            warn!(stage = self.stage, error = %e, "pull error");
                            continue;
                        }
                        None => return Err(unavailable(&"message stream ended")),
                    };
                    delivered += 1;
                    let inject_panic = self.settings.fault_panic_every > 0 && delivered % self.settings.fault_panic_every == 0;
                    let job = Job { stage: self.stage, handler: self.handler.clone(), publisher: self.publisher.clone(), progress_every: self.settings.ack_wait() / 3, max_deliver: self.settings.max_deliver.max(1) as u64, inject_panic };
                    running.spawn(async move { job.process(message).await; drop(slot); });
                }
            }
        }
        // Hand back what was pulled but not started, so another replica takes it now.
        while let Some(Some(Ok(m))) = messages.next().now_or_never() {
            let _ = m.ack_with(AckKind::Nak(None)).await;
            metrics::NAKS.with_label_values(&[self.stage]).inc();
        }
        drop(messages);
        let drained = running.len();
        while let Some(done) = running.join_next().await {
            propagate_panic(done);
        }
        info!(stage = self.stage, finished_in_flight = drained, "drained");
        Ok(())
    }
}

fn propagate_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

struct Job<H> {
    stage: &'static str,
    handler: Arc<H>,
    publisher: Publisher,
    progress_every: Duration,
    max_deliver: u64,
    inject_panic: bool,
}

impl<H: Handler> Job<H> {
    async fn process(self, message: jetstream::Message) {
        let stage = self.stage;
        let started = Instant::now();
        let delivery = delivery_of(&message);
        metrics::MESSAGES_IN.with_label_values(&[stage]).inc();
        if delivery.deliveries > 1 {
            metrics::REDELIVERIES.with_label_values(&[stage]).inc();
        }
        let span = tracing::info_span!("stage", stage, subject = %delivery.subject, msg_id = delivery.msg_id.as_deref().unwrap_or(""));
        span.set_parent(trace::extract(delivery.headers.as_ref())).ok();
        let outcome =
            AssertUnwindSafe(self.with_progress(&message, &delivery).instrument(span.clone())).catch_unwind().await;
        let result = match outcome {
            Ok(result) => result,
            Err(panic) => {
                // Hand the message straight back, then let the supervisor see the panic.
                let _ = message.ack_with(AckKind::Nak(None)).await;
                metrics::NAKS.with_label_values(&[stage]).inc();
                std::panic::resume_unwind(panic);
            }
        };
        let (kind, counter) = match result {
            Ok(()) => (AckKind::Ack, &metrics::ACKS),
            // The server will not deliver it again: dead-letter it now rather than rely on
            // the advisory (which the server does not send for a nak on the last delivery).
            Err(StageError::Transient { detail, .. }) if delivery.deliveries >= self.max_deliver => {
                let detail = format!("gave up after {} deliveries: {detail}", delivery.deliveries);
                self.dead_letter(&span, &delivery, TerminalStatus::Failed, "max_deliveries", &detail, None).await
            }
            Err(StageError::Transient { detail, delay }) => {
                debug!(parent: &span, stage, %detail, ?delay, "transient failure: nak");
                (AckKind::Nak(Some(delay)), &metrics::NAKS)
            }
            Err(StageError::Permanent { status, reason, detail, ctx }) => {
                self.dead_letter(&span, &delivery, status, &reason, &detail, ctx).await
            }
        };
        if let Err(e) = message.ack_with(kind).await {
            warn!(stage, error = %e, "ack failed; the message will be redelivered");
        }
        counter.with_label_values(&[stage]).inc();
        metrics::STAGE_LATENCY.with_label_values(&[stage]).observe(started.elapsed().as_secs_f64());
    }

    /// DLQ record + terminal result, then term; if the DLQ cannot be reached, keep the message.
    async fn dead_letter(
        &self,
        span: &tracing::Span,
        delivery: &Delivery,
        status: TerminalStatus,
        reason: &str,
        detail: &str,
        ctx: Option<RequestContext>,
    ) -> (AckKind, &'static LazyLock<IntCounterVec>) {
        let stage = self.stage;
        warn!(parent: span, stage, %reason, %detail, "dead-lettering");
        match dlq::dead_letter(&self.publisher, stage, delivery, status, reason, detail, ctx).await {
            Ok(()) => (AckKind::Term, &metrics::TERMS),
            Err(e) => {
                warn!(parent: span, stage, error = %e, "dead-lettering failed: nak");
                (AckKind::Nak(Some(Duration::from_secs(1))), &metrics::NAKS)
            }
        }
    }

    /// Runs the handler, telling the server the work is still in progress every
    /// `progress_every` so long work is not redelivered to another worker meanwhile.
    async fn with_progress(&self, message: &jetstream::Message, delivery: &Delivery) -> Result<(), StageError> {
        if self.inject_panic && delivery.deliveries == 1 {
            panic!("injected fault (--fault-panic-every) in stage {}", self.stage);
        }
        let work = self.handler.handle(delivery);
        let mut work = std::pin::pin!(work);
        let period = self.progress_every.max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = ticks.tick() => { let _ = message.ack_with(AckKind::Progress).await; }
            }
        }
    }
}

fn delivery_of(message: &jetstream::Message) -> Delivery {
    let info = message.info().ok();
    Delivery {
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

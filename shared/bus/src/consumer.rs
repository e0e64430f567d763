//! A stage's durable pull consumer: messages feed a bounded pool of workers; each message is
//! acked only after its effect, naked with a delay on transient errors, kept alive with
//! in-progress acks while it is held, and dead-lettered then termed when it can never succeed.
//!
//! A message is settled through its [`AckHandle`]. A plain [`Handler`] settles it when its
//! future resolves (its worker slot is held meanwhile); a [`DeferringHandler`] takes the handle
//! and gives its worker slot back at once, so a stage that holds messages until some later
//! event (the batcher, until a batch is published) is bounded by the consumer's
//! `max_ack_pending`, not by its worker count.
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use millrace_proto::v1::{RequestContext, TerminalStatus};
use prometheus::IntCounterVec;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::delivery::{Delivery, StageError};
use crate::lag::{self, LagExport};
use crate::topology::{self, ConsumerSpec};
use crate::{BusError, BusSettings, Publisher, dlq, metrics, trace};

/// A stage's logic for one message. The effect (publish with PubAck, commit) must be complete
/// when the future resolves `Ok`: the message is acked right after.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Result<(), StageError>> + Send;
}

/// A shared handler (one the caller also keeps, to look into) handles as the handler does.
impl<H: Handler> Handler for Arc<H> {
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Result<(), StageError>> + Send {
        H::handle(self, delivery)
    }
}

/// A stage's logic for a message it may hold past its handler's return: it owns the message's
/// [`AckHandle`] and settles it once the effect is done (or drops it: the message is handed
/// back). `accept` should return soon; its worker slot is held until then.
pub trait DeferringHandler: Send + Sync + 'static {
    fn accept(&self, delivery: Delivery, ack: AckHandle) -> impl Future<Output = ()> + Send;
}

/// Runs a plain [`Handler`] as a [`DeferringHandler`] that settles when the handler returns.
pub struct Immediate<H>(pub Arc<H>);

impl<H: Handler> DeferringHandler for Immediate<H> {
    async fn accept(&self, delivery: Delivery, ack: AckHandle) {
        loop {
            let result = self.0.handle(&delivery).await;
            // Held, not naked, while the next edge is full: a nak would spend a delivery.
            // Draining hands it back instead.
            if let Err(StageError::Backpressure { delay, .. }) = &result {
                metrics::BACKPRESSURE_WAITS.with_label_values(&[ack.stage()]).inc();
                tokio::select! {
                    _ = tokio::time::sleep(*delay) => continue,
                    _ = ack.draining.cancelled() => {}
                }
            }
            return ack.settle(result).await;
        }
    }
}

/// Pulls one durable consumer and runs its handler on up to `workers` messages at once. The
/// consumer's durable name is also the stage's name (in timings, metrics, logs and dead letters).
pub struct StageConsumer<H> {
    pub spec: ConsumerSpec,
    pub handler: Arc<H>,
    pub publisher: Publisher,
    pub settings: BusSettings,
    /// How often the consumer's lag is read for its gauges ([`lag`]).
    pub lag_poll: Duration,
}

impl<H: Handler> StageConsumer<Immediate<H>> {
    pub fn new(spec: ConsumerSpec, handler: H, publisher: Publisher, settings: BusSettings) -> Self {
        Self::deferring(spec, Immediate(Arc::new(handler)), publisher, settings)
    }
}

impl<H: DeferringHandler> StageConsumer<H> {
    pub fn deferring(spec: ConsumerSpec, handler: H, publisher: Publisher, settings: BusSettings) -> Self {
        Self { spec, handler: Arc::new(handler), publisher, settings, lag_poll: lag::LAG_POLL_PERIOD }
    }

    /// The stage's name: the consumer's durable name.
    pub fn stage(&self) -> &'static str {
        self.spec.durable
    }

    /// Runs until `shutdown`, then drains: stops pulling, hands back messages it has not
    /// started, and waits for the running ones (whose publishes complete before their acks).
    /// A panic in a handler naks that message and then propagates, so the supervisor restarts
    /// this consumer.
    pub async fn run(&self, shutdown: CancellationToken, on_ready: impl Fn()) -> Result<(), BusError> {
        let stage = self.stage();
        let js = self.publisher.jetstream().clone();
        let context = || format!("consumer {}", self.spec.durable);
        let stream = js.get_stream(self.spec.edge.stream).await.map_err(|e| BusError::unavailable(context(), e))?;
        // The reader owns its consumer's settings: create-or-update to this process's flags.
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(topology::consumer_config(&self.settings, self.spec.durable))
            .await
            .map_err(|e| BusError::unavailable(context(), e))?;
        // Exported while this runs, whichever way it ends (drain, error, panic).
        let _lag = LagExport::spawn(consumer.clone(), self.spec, self.lag_poll);
        metrics::show_stage(stage);
        let workers = self.settings.workers.max(1);
        let mut messages = pull(&consumer, workers).await.map_err(|e| BusError::unavailable(context(), e))?;
        let advisories = dlq::MaxDeliveriesListener::new(self.spec, self.publisher.clone());
        let mut advisories = std::pin::pin!(advisories.run(shutdown.clone()));
        let slots = Arc::new(Semaphore::new(workers));
        let mut running = JoinSet::new();
        let mut delivered = 0u64;
        info!(stage, workers, "consuming");
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
                        next = tokio::time::timeout(STALL_CHECK, messages.next()) => next,
                    };
                    let Ok(next) = next else {
                        // Nothing for a while: idle, or our pulls are gone (see STALL_CHECK).
                        if pulls_lost(&mut consumer).await {
                            warn!(stage, "the server holds no pull of this consumer: pulling afresh");
                            messages = pull(&consumer, workers).await.map_err(|e| BusError::unavailable(context(), e))?;
                        }
                        continue;
                    };
                    let message = match next {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            // Heartbeat misses and pull errors: the stream re-issues pulls itself.
                            warn!(stage, error = %e, "pull error");
                            continue;
                        }
                        None => return Err(BusError::gone(format!("{}: message stream ended", context()))),
                    };
                    delivered += 1;
                    let inject_panic = self.settings.fault_panic_every > 0 && delivered.is_multiple_of(self.settings.fault_panic_every);
                    let ack = AckHandle::new(stage, message, self.publisher.clone(), &self.settings, shutdown.clone());
                    let handler = self.handler.clone();
                    running.spawn(async move { accept(handler, ack, inject_panic).await; drop(slot); });
                }
            }
        }
        // Hand back what was pulled but not started, so another replica takes it now.
        while let Some(Some(Ok(m))) = messages.next().now_or_never() {
            let _ = m.ack_with(AckKind::Nak(None)).await;
            metrics::NAKS.with_label_values(&[stage]).inc();
        }
        drop(messages);
        let drained = running.len();
        while let Some(done) = running.join_next().await {
            propagate_panic(done);
        }
        info!(stage, finished_in_flight = drained, "drained");
        Ok(())
    }
}

/// How long a consumer waits for a message before asking the server whether it still holds a
/// pull of this consumer. When a cluster node dies, pull requests registered with the
/// consumer's leader there die with it; the client's pull stream is meant to notice missed
/// heartbeats and pull again, but the chaos suite's `cluster` schedule saw a batcher whose
/// stream did neither after `kill` of the leader's node: no error, no pull waiting at the
/// server, every prompt held unacked and the whole mesh backed up behind it.
const STALL_CHECK: Duration = Duration::from_secs(10);

/// A pull stream on `consumer`. A pull of one message only re-pulls once it is fully consumed,
/// and then at times not until the pull expired (seen: 35 s stalls with one worker): pull at
/// least two, and let pulls expire soon so any lost one costs seconds, not half a minute.
async fn pull(
    consumer: &jetstream::consumer::PullConsumer,
    workers: usize,
) -> Result<jetstream::consumer::pull::Stream, jetstream::consumer::StreamError> {
    consumer
        .stream()
        .max_messages_per_batch(workers.max(2))
        .heartbeat(Duration::from_secs(2))
        .expires(Duration::from_secs(5))
        .messages()
        .await
}

/// The server says no pull of this consumer is waiting, while this process believes it has
/// one out (its stream re-pulls at least every 5 s). An unanswered question counts as no.
async fn pulls_lost(consumer: &mut jetstream::consumer::PullConsumer) -> bool {
    match consumer.info().await {
        Ok(info) => info.num_waiting == 0,
        Err(_) => false,
    }
}

fn propagate_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Runs the handler on one message inside the message's trace span. A panic drops the handle
/// (which hands the message back) and then reaches the supervisor.
async fn accept<H: DeferringHandler>(handler: Arc<H>, ack: AckHandle, inject_panic: bool) {
    let delivery = ack.delivery().clone();
    let stage = ack.stage();
    metrics::MESSAGES_IN.with_label_values(&[stage]).inc();
    if delivery.deliveries > 1 {
        metrics::REDELIVERIES.with_label_values(&[stage]).inc();
    }
    let span = ack.span().clone();
    let work = async move {
        if inject_panic && delivery.deliveries == 1 {
            panic!("injected fault (--fault-panic-every) in stage {stage}");
        }
        handler.accept(delivery, ack).await
    };
    if let Err(panic) = AssertUnwindSafe(work.instrument(span)).catch_unwind().await {
        std::panic::resume_unwind(panic);
    }
}

/// The right to settle one delivered message: ack, nak with a delay, or dead-letter and term.
/// While it is held the server is told every `ack_wait / 3` that the work is in progress, so
/// the message is not redelivered meanwhile; dropped unsettled (its holder restarted, drained
/// or panicked), it is settled as a transient failure: handed back at once, or dead-lettered
/// if that was its last delivery (the server would not deliver it again).
pub struct AckHandle {
    settlement: Option<Settlement>,
    progress: tokio::task::JoinHandle<()>,
    /// Cancelled when the consumer starts draining.
    draining: CancellationToken,
}

/// What settling a message needs.
struct Settlement {
    stage: &'static str,
    delivery: Delivery,
    span: tracing::Span,
    publisher: Publisher,
    max_deliver: u64,
    started: Instant,
    message: jetstream::Message,
}

impl AckHandle {
    fn new(
        stage: &'static str,
        message: jetstream::Message,
        publisher: Publisher,
        settings: &BusSettings,
        draining: CancellationToken,
    ) -> Self {
        let delivery = Delivery::of(&message);
        let span = tracing::info_span!("stage", stage, subject = %delivery.subject, msg_id = delivery.msg_id.as_deref().unwrap_or(""));
        span.set_parent(trace::extract(delivery.headers.as_ref())).ok();
        let period = (settings.ack_wait() / 3).max(Duration::from_millis(100));
        let progress = tokio::spawn({
            let message = message.clone();
            async move {
                let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                loop {
                    ticks.tick().await;
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        });
        let settlement = Settlement {
            stage,
            delivery,
            span,
            publisher,
            max_deliver: settings.max_deliver.max(1) as u64,
            started: Instant::now(),
            message,
        };
        Self { settlement: Some(settlement), progress, draining }
    }

    fn settlement(&self) -> &Settlement {
        self.settlement.as_ref().expect("an ack handle is settled only by consuming it")
    }

    /// The message's delivery, as its handler saw it.
    pub fn delivery(&self) -> &Delivery {
        &self.settlement().delivery
    }

    fn span(&self) -> &tracing::Span {
        &self.settlement().span
    }

    fn stage(&self) -> &'static str {
        self.settlement().stage
    }

    /// Settles the message by the outcome of its work: `Ok` acks; a transient error naks with
    /// its delay (or, on the last delivery, dead-letters); a permanent one dead-letters and terms.
    pub async fn settle(mut self, outcome: Result<(), StageError>) {
        self.progress.abort();
        if let Some(settlement) = self.settlement.take() {
            settlement.settle(outcome).await;
        }
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        self.progress.abort();
        if let Some(settlement) = self.settlement.take() {
            let handed_back = StageError::transient("handed back unsettled", Duration::ZERO);
            tokio::spawn(settlement.settle(Err(handed_back)));
        }
    }
}

impl Settlement {
    async fn settle(self, outcome: Result<(), StageError>) {
        let (stage, span) = (self.stage, self.span.clone());
        let (kind, counter) = match outcome {
            Ok(()) => (AckKind::Ack, &metrics::ACKS),
            // The server will not deliver it again: dead-letter it now rather than rely on
            // the advisory (which the server does not send for a nak on the last delivery).
            Err(StageError::Transient { detail, .. } | StageError::Backpressure { detail, .. })
                if self.delivery.deliveries >= self.max_deliver =>
            {
                let detail = format!("gave up after {} deliveries: {detail}", self.delivery.deliveries);
                self.dead_letter(TerminalStatus::Failed, dlq::MAX_DELIVERIES, &detail, None).await
            }
            Err(StageError::Transient { detail, delay } | StageError::Backpressure { detail, delay }) => {
                debug!(parent: &span, stage, %detail, ?delay, "transient failure: nak");
                (AckKind::Nak(Some(delay)), &metrics::NAKS)
            }
            Err(StageError::Permanent { status, reason, detail, ctx }) => {
                self.dead_letter(status, &reason, &detail, ctx.map(|c| *c)).await
            }
        };
        if let Err(e) = self.message.ack_with(kind).await {
            warn!(parent: &span, stage, error = %e, "ack failed; the message will be redelivered");
        }
        counter.with_label_values(&[stage]).inc();
        metrics::STAGE_LATENCY.with_label_values(&[stage]).observe(self.started.elapsed().as_secs_f64());
    }

    /// DLQ record + terminal result, then term; if the DLQ cannot be reached, keep the message.
    async fn dead_letter(
        &self,
        status: TerminalStatus,
        reason: &str,
        detail: &str,
        ctx: Option<RequestContext>,
    ) -> (AckKind, &'static LazyLock<IntCounterVec>) {
        let (stage, span) = (self.stage, &self.span);
        warn!(parent: span, stage, %reason, %detail, "dead-lettering");
        match dlq::dead_letter(&self.publisher, stage, &self.delivery, status, reason, detail, ctx).await {
            Ok(()) => (AckKind::Term, &metrics::TERMS),
            Err(e) => {
                warn!(parent: span, stage, error = %e, "dead-lettering failed: nak");
                (AckKind::Nak(Some(Duration::from_secs(1))), &metrics::NAKS)
            }
        }
    }
}

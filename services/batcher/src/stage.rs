//! The stage PROMPTS → BATCHES: the scheduler in front of the inference replicas.
//!
//! ```text
//! prompt consumer ──(Prompt, AckHandle)──► queue task ──Batch──► publish task ──PubAck──► acks
//!   (takes each message, returns at once)   owns Queues            (one per batch)
//! cancel listener ──request id──────────►      ▲
//! capacity follower (mr.v1.capacity.*) ────────┤
//! BATCHES subject counts (every poll) ─────────┘
//! ```
//!
//! Each delivered prompt is handed, with its message's [`AckHandle`], to the one task that owns
//! the per-model [`Queues`]; the consumer's worker is free again at once, so how many prompts
//! wait is bounded by the consumer's `max_ack_pending`, not by its workers. The prompt's message
//! is acked only once the batch holding it has its PubAck (ack after effect), or once the
//! terminal result of a request dropped (expired, cancelled, or refused as overloaded: the
//! queue is full, or the work ahead would outlast the deadline) is published. A prompt's cost,
//! which fair share charges, is its prompt tokens plus its `max_new_tokens` (or
//! `--expected-new-tokens` when it sets none). A crash between a batch's PubAck and those acks
//! redelivers the members; they
//! form their batch again and, since a batch's id is derived from its members' request ids
//! (`Nats-Msg-Id = <batch_id>/batcher`), the stream drops the second copy. Should the
//! redelivered members be grouped differently, inference runs a request twice and its outputs'
//! ids (`<request_id>/inference`) keep one.
//!
//! Inference replicas publish their load (`ReplicaCapacity`, core NATS) on
//! `mr.v1.capacity.<model>`; the capacity follower hands each report to the queue task, which
//! credits the model with the replica's free slots (see [`crate::queue`]). Every batcher replica
//! hears every report (no queue group). Reports are best effort: a lost one is made up by the
//! next, and a model whose reports stop falls back to the in-flight gate once they age out.
//!
//! The queue task wakes on a command, on a PubAck, count or capacity report, or on the timer
//! for the next `max_wait`, deadline or report to age out; it then sweeps, dispatches whatever
//! is due, and starts each batch's publish without waiting for it.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Stream as JsStream;
use futures::{StreamExt as _, TryStreamExt};
use millrace_bus::topology::ephemeral;
use millrace_bus::{
    AckHandle, BusError, BusSettings, ConsumerSpec, DeferringHandler, Delivery, Edge, Outbound, Publisher, StageError,
    terminal_result,
};
use millrace_proto::v1::{Batch, Prompt, ReplicaCapacity, Result as TerminalResult, TerminalStatus};
use millrace_proto::{Message as _, now_unix_ms, now_unix_us};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics;
use crate::queue::{self, Admission, DropReason, Dropped, Limits, Overload, Queues, ReplicaLoad, Request};

/// This stage's name in timings, terminal results and dedup ids.
pub const STAGE: &str = ConsumerSpec::BATCHER.durable;

/// How long a handed-back prompt waits before redelivery when its batch could not be published.
const PUBLISH_RETRY: Duration = Duration::from_millis(500);

/// A prompt waiting in a queue, with the right to ack its message.
pub struct Waiter {
    prompt: Prompt,
    ack: AckHandle,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("request_id", &self.prompt.ctx.as_ref().map(|c| &c.request_id)).finish()
    }
}

#[derive(Debug)]
enum Command {
    Prompt { model: String, waiter: Box<Waiter> },
    Cancel(String),
}

/// What the queue task's own helpers tell it.
enum Event {
    Published { model: String, ok: bool, at: Instant },
    Counted { counts: HashMap<String, usize>, asked_at: Instant },
    Capacity { model: String, report: ReplicaCapacity, received: Instant },
}

/// The senders' side (handlers, cancel listener): cheap to clone.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::Sender<Command>,
}

/// The queue task's side, kept across restarts of that task.
#[derive(Clone)]
pub struct QueueInbox {
    rx: Arc<Mutex<mpsc::Receiver<Command>>>,
}

pub fn channel(capacity: usize) -> (QueueHandle, QueueInbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (QueueHandle { tx }, QueueInbox { rx: Arc::new(Mutex::new(rx)) })
}

impl QueueHandle {
    /// Hands the prompt and its message's ack handle to the queue task, which settles it once
    /// the prompt's batch is published or its request is dropped. A queue task that is not
    /// running hands the message back (as does one that restarts: it drops its waiters).
    pub async fn submit(&self, model: String, prompt: Prompt, ack: AckHandle) {
        if let Err(mpsc::error::SendError(Command::Prompt { waiter, .. })) =
            self.tx.send(Command::Prompt { model, waiter: Box::new(Waiter { prompt, ack }) }).await
        {
            waiter.ack.settle(Err(StageError::transient("the batch queue is not running", Duration::ZERO))).await;
        }
    }

    /// Passes a cancel notice on.
    pub async fn cancel(&self, request_id: &str) {
        let _ = self.tx.send(Command::Cancel(request_id.to_owned())).await;
    }
}

/// The PROMPTS handler: hands each prompt, with its ack handle, to its model's queue.
pub struct PromptStage {
    pub queue: QueueHandle,
}

impl DeferringHandler for PromptStage {
    async fn accept(&self, delivery: Delivery, ack: AckHandle) {
        match admit(&delivery) {
            Ok((model, prompt)) => self.queue.submit(model, prompt, ack).await,
            Err(e) => ack.settle(Err(e)).await,
        }
    }
}

/// The prompt of a delivery and the model it is queued for.
fn admit(delivery: &Delivery) -> Result<(String, Prompt), StageError> {
    let prompt: Prompt = delivery.decode()?;
    let ctx = millrace_bus::require_request(prompt.ctx.as_ref())?;
    let model = model_of(&delivery.subject, &ctx.model).ok_or_else(|| {
        StageError::poison(TerminalStatus::Failed, "missing_model", "a prompt names no model", prompt.ctx.clone())
    })?;
    Ok((model, prompt))
}

/// The model a prompt is queued for: its subject's `<model>` token (what routed it here),
/// else the one its context names.
pub fn model_of(subject: &str, ctx_model: &str) -> Option<String> {
    subject
        .strip_prefix(Edge::PROMPTS.subject)
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|m| !m.is_empty())
        .or(Some(ctx_model).filter(|m| !m.is_empty()))
        .map(str::to_owned)
}

/// A batch's id: derived from its model and its members' request ids (in any order), so the
/// same members batched again carry the same id and the stream deduplicates them.
pub fn batch_id<'a>(model: &str, request_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut ids: Vec<&str> = request_ids.into_iter().collect();
    ids.sort_unstable();
    // Length-prefixed, so no choice of ids can make two different member lists collide.
    let mut name = format!("millrace.batch/{}:{model}", model.len());
    for id in ids {
        name.push_str(&format!("/{}:{id}", id.len()));
    }
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

/// The terminal result of a request dropped before its batch, on RESULTS.
pub fn dropped_result(mut prompt: Prompt, reason: DropReason, waited: Duration, received_unix_us: i64) -> Outbound {
    prompt.timings.get_or_insert_default().record(STAGE, received_unix_us);
    let waited = waited.as_millis();
    let (status, code, detail, retry_after_ms) = match reason {
        DropReason::Expired => (
            TerminalStatus::Expired,
            "deadline_exceeded",
            format!("the deadline passed before the request was batched (queued {waited} ms)"),
            0,
        ),
        DropReason::Cancelled => (
            TerminalStatus::Cancelled,
            "cancelled",
            format!("cancelled before the request was batched (queued {waited} ms)"),
            0,
        ),
        DropReason::Overloaded { cause, retry_after } => {
            // Rounded up: retrying after the hint must not come early.
            let ms = u32::try_from(retry_after.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX).max(1);
            let detail = match cause {
                Overload::QueueFull => format!("the model's queue is full; retry in {ms} ms"),
                Overload::DeadlineUnreachable => {
                    format!("the work queued ahead would outlast the request's deadline; retry in {ms} ms")
                }
            };
            (TerminalStatus::RateLimited, "overloaded", detail, ms)
        }
    };
    Outbound::terminal(&TerminalResult {
        prompt: prompt.prompt,
        verdicts: prompt.verdicts,
        prompt_tokens: prompt.prompt_tokens,
        retry_after_ms,
        ..terminal_result(STAGE, prompt.ctx, prompt.timings, status, code, detail)
    })
}

/// The queue task's settings.
pub struct Batching {
    pub limits: Limits,
    pub publisher: Publisher,
    /// How often the batches left in BATCHES are counted.
    pub count_every: Duration,
    /// New tokens expected of a prompt that sets no `max_new_tokens` (its cost).
    pub expected_new_tokens: u32,
    /// The bus settings, which size the memory of cancel notices.
    pub bus: BusSettings,
    /// Test fault: abort right after the first batch's PubAck.
    pub fault_abort_after_publish: bool,
}

/// Aborts the wrapped task when dropped (the counter must not outlive its queue task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the queues until `shutdown`, then hands back what is still queued (its messages are
/// naked and redelivered, here or to another replica).
pub async fn run(
    inbox: &QueueInbox,
    batching: &Batching,
    shutdown: CancellationToken,
    on_ready: impl Fn(),
) -> Result<(), BusError> {
    let mut rx = inbox.rx.lock().await;
    let mut queues = Queues::new(batching.limits, batching.bus.cancel_memory());
    let stream = batching
        .publisher
        .jetstream()
        .get_stream(Edge::BATCHES.stream)
        .await
        .map_err(|e| BusError::unavailable(format!("stream {}", Edge::BATCHES.stream), e))?;
    // Counted before any prompt is taken: batches left in flight before a restart, or by
    // another replica, keep their model busy.
    let asked_at = Instant::now();
    queues.observe(&count_batches(&stream).await?, asked_at);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let _counter = AbortOnDrop(tokio::spawn(count_periodically(stream, batching.count_every, events_tx.clone())));
    let reports = subscribe_capacity(&batching.publisher).await?;
    let _capacity = AbortOnDrop(tokio::spawn(follow_capacity(reports, events_tx.clone())));
    let mut depth_series = DepthSeries::default();
    info!(limits = ?batching.limits, "batching");
    on_ready();
    loop {
        let wake = queues.next_wake();
        let timer = async move {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            command = rx.recv() => match command {
                Some(command) => apply(&mut queues, command, batching),
                None => break,
            },
            Some(event) = events.recv() => match event {
                Event::Published { model, ok: true, at } => queues.published(&model, at),
                Event::Published { model, ok: false, .. } => queues.publish_failed(&model),
                Event::Counted { counts, asked_at } => queues.observe(&counts, asked_at),
                Event::Capacity { model, report, received } => {
                    let load = replica_load(&report);
                    metrics::show_replica(&model, &report, load.free_slots());
                    queues.report(&model, load, received);
                }
            },
            _ = timer => {}
        }
        // Take the whole burst that has arrived before deciding what goes.
        while let Ok(command) = rx.try_recv() {
            apply(&mut queues, command, batching);
        }
        let cycle = queues.poll(Instant::now());
        for (model, replica) in &cycle.replicas_gone {
            info!(model, replica, "replica's capacity reports aged out");
            metrics::forget_replica(model, replica);
        }
        for dropped in cycle.dropped {
            answer_dropped(dropped, &batching.publisher);
        }
        for batch in cycle.batches {
            start_publish(batch, batching, events_tx.clone());
        }
        depth_series.show(&queues);
        for model in queues.models() {
            metrics::show_model(model);
            metrics::IN_FLIGHT.with_label_values(&[model]).set(queues.in_flight(model) as i64);
            match queues.free_slots(model) {
                Some(free) => metrics::FREE_SLOTS.with_label_values(&[model]).set(free as i64),
                // Absent already when the model never had a report: nothing to remove.
                None => drop(metrics::FREE_SLOTS.remove_label_values(&[model])),
            }
            if let Some(rate) = queues.drain_rate(model) {
                metrics::DRAIN_RATE.with_label_values(&[model]).set(rate);
            }
        }
    }
    // Draining: refuse what comes next, hand back what waits. Batches being published answer
    // their members themselves.
    rx.close();
    let mut waiting: Vec<Waiter> = queues.take_all();
    while let Ok(command) = rx.try_recv() {
        if let Command::Prompt { waiter, .. } = command {
            waiting.push(*waiter);
        }
    }
    let handed_back = waiting.len();
    // Awaited, and flushed, before the process exits: a nak still in a task or a buffer when it
    // does would leave the prompt to its ack wait instead of the next batcher at once.
    let draining = || StageError::transient("the batcher is draining", Duration::ZERO);
    futures::future::join_all(waiting.into_iter().map(|waiter| waiter.ack.settle(Err(draining())))).await;
    if let Err(e) = batching.publisher.client().flush().await {
        warn!(error = %e, "hand-backs not flushed; the prompts come back after their ack wait");
    }
    depth_series.show(&queues);
    info!(handed_back, "batch queue drained");
    Ok(())
}

/// One reading of both clocks, against which every deadline is placed on the monotonic clock:
/// two requests with the same `deadline_unix_ms` then get the same instant, and the queue's
/// arrival order decides between them (reading both clocks per request put sub-millisecond
/// noise between them, which reordered equal deadlines).
static CLOCK_ANCHOR: LazyLock<(Instant, i64)> = LazyLock::new(|| (Instant::now(), now_unix_ms()));

fn apply(queues: &mut Queues<Waiter>, command: Command, batching: &Batching) {
    let now = Instant::now();
    match command {
        Command::Prompt { model, waiter } => {
            let ctx = waiter.prompt.ctx.clone().unwrap_or_default();
            let max_new_tokens = ctx.params.as_ref().map_or(0, |p| p.max_new_tokens);
            let new_tokens = if max_new_tokens == 0 { batching.expected_new_tokens } else { max_new_tokens };
            let request = Request {
                request_id: ctx.request_id.clone(),
                tenant: ctx.tenant.clone(),
                priority: ctx.priority,
                sequence: waiter.ack.delivery().stream_sequence,
                tokens: waiter.prompt.prompt_tokens,
                cost: u64::from(waiter.prompt.prompt_tokens) + u64::from(new_tokens),
                deadline: ctx.deadline_instant(CLOCK_ANCHOR.0, CLOCK_ANCHOR.1),
                payload: *waiter,
            };
            match queues.push(&model, request, now) {
                Admission::Queued | Admission::Joined => {}
                Admission::Dropped(dropped) => answer_dropped(dropped, &batching.publisher),
            }
        }
        Command::Cancel(request_id) => {
            metrics::CANCEL_NOTICES.inc();
            if let Some(dropped) = queues.cancel(&request_id, now) {
                answer_dropped(dropped, &batching.publisher);
            }
        }
    }
}

/// The queue-depth series shown, so that a priority whose requests are all gone loses its
/// series instead of showing its last depth.
#[derive(Default)]
struct DepthSeries(HashSet<(String, i32)>);

impl DepthSeries {
    fn show(&mut self, queues: &Queues<Waiter>) {
        let mut shown = HashSet::new();
        for model in queues.models() {
            for (priority, depth) in queues.depth_by_priority(model) {
                metrics::QUEUE_DEPTH.with_label_values(&[model, &priority.to_string()]).set(depth as i64);
                shown.insert((model.to_owned(), priority));
            }
        }
        for (model, priority) in self.0.difference(&shown) {
            // Shown by this process, so present: removing cannot fail.
            let _ = metrics::QUEUE_DEPTH.remove_label_values(&[model, &priority.to_string()]);
        }
        self.0 = shown;
    }
}

/// Publishes each dropped request's terminal result in its own task, then settles its
/// messages (acked once the result has its PubAck, handed back if it could not be published).
fn answer_dropped(dropped: Dropped<Waiter>, publisher: &Publisher) {
    debug!(request_id = dropped.request_id, reason = dropped.reason.as_str(), "dropped before batching");
    metrics::DROPPED.with_label_values(&[&dropped.model, dropped.reason.as_str()]).inc();
    if let DropReason::Overloaded { cause, .. } = dropped.reason {
        metrics::REFUSED.with_label_values(&[&dropped.model, cause.as_str()]).inc();
    }
    let (waited, reason) = (dropped.arrived.elapsed(), dropped.reason);
    for waiter in dropped.payloads {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let received_unix_us = waiter.ack.delivery().received_unix_us;
            let result = dropped_result(waiter.prompt, reason, waited, received_unix_us);
            let published = publisher.publish(result).await.map(drop).map_err(StageError::from);
            waiter.ack.settle(published).await;
        });
    }
}

/// Builds the batch message and publishes it in its own task; after the PubAck, its members'
/// handlers are answered (and their messages acked).
fn start_publish(batch: queue::Batch<Waiter>, batching: &Batching, events: mpsc::UnboundedSender<Event>) {
    let id = batch_id(&batch.model, batch.request_ids());
    let (model, reason) = (batch.model.clone(), batch.reason.as_str());
    let labels = [model.as_str()];
    metrics::BATCH_SIZE.with_label_values(&labels).observe(batch.members.len() as f64);
    metrics::BATCH_TOKENS.with_label_values(&labels).observe(batch.tokens as f64);
    metrics::DISPATCHES.with_label_values(&[model.as_str(), reason]).inc();
    let mut prompts = Vec::with_capacity(batch.members.len());
    let mut acks = Vec::new();
    for member in batch.members {
        metrics::QUEUE_WAIT
            .with_label_values(&[model.as_str(), &member.priority.to_string(), &member.tenant])
            .observe(member.arrived.elapsed().as_secs_f64());
        for (i, waiter) in member.payloads.into_iter().enumerate() {
            if i == 0 {
                let mut prompt = waiter.prompt;
                prompt.timings.get_or_insert_default().record(STAGE, waiter.ack.delivery().received_unix_us);
                prompts.push(prompt);
            }
            acks.push(waiter.ack);
        }
    }
    debug!(batch_id = id, model, reason, size = prompts.len(), tokens = batch.tokens, "dispatching");
    let message = Batch {
        batch_id: id.clone(),
        model: model.clone(),
        prompts,
        created_unix_us: now_unix_us(),
        dispatch_reason: reason.to_owned(),
    };
    let out = Outbound::batch(&message);
    let (publisher, abort) = (batching.publisher.clone(), batching.fault_abort_after_publish);
    tokio::spawn(async move {
        let published = publisher.publish(out).await;
        let at = Instant::now();
        if abort && published.is_ok() {
            eprintln!("batcher: injected fault (--fault-abort-after-publish): aborting after the PubAck of batch {id}");
            std::process::abort();
        }
        let _ = events.send(Event::Published { model, ok: published.is_ok(), at });
        let outcome = match published {
            Ok(ack) => {
                debug!(batch_id = id, duplicate = ack.duplicate, "batched");
                Ok(())
            }
            Err(e) => {
                warn!(batch_id = id, error = %e, "batch not published: its prompts are handed back");
                Err(format!("publishing batch {id}: {e}"))
            }
        };
        futures::future::join_all(
            acks.into_iter()
                .map(|ack| ack.settle(outcome.clone().map_err(|e| StageError::transient(e, PUBLISH_RETRY)))),
        )
        .await;
    });
}

/// Subscribes to every model's capacity reports (no queue group: every batcher replica hears
/// every report).
async fn subscribe_capacity(publisher: &Publisher) -> Result<async_nats::Subscriber, BusError> {
    let client = publisher.client();
    let subscribe = format!("subscribe {}", ephemeral::CAPACITY_ALL);
    let reports = client.subscribe(ephemeral::CAPACITY_ALL).await.map_err(|e| BusError::unavailable(&subscribe, e))?;
    // Flushed, so the server has the subscription before this task reports ready.
    client.flush().await.map_err(|e| BusError::unavailable(subscribe, e))?;
    Ok(reports)
}

/// Hands each capacity report to the queue task, with the model its subject names (else the
/// one it names itself) and when it arrived.
async fn follow_capacity(mut reports: async_nats::Subscriber, events: mpsc::UnboundedSender<Event>) {
    let prefix = ephemeral::capacity("");
    while let Some(message) = reports.next().await {
        let received = Instant::now();
        let report = match ReplicaCapacity::decode(message.payload) {
            Ok(report) => report,
            Err(e) => {
                warn!(subject = %message.subject, error = %e, "capacity report not decodable: ignored");
                continue;
            }
        };
        let model = message.subject.as_str().strip_prefix(prefix.as_str()).filter(|m| !m.is_empty());
        let model = model.unwrap_or(&report.model).to_owned();
        if model.is_empty() || report.replica.is_empty() {
            warn!(subject = %message.subject, "capacity report names no model or replica: ignored");
            continue;
        }
        if events.send(Event::Capacity { model, report, received }).is_err() {
            return;
        }
    }
    warn!("capacity subscription ended: models fall back to the in-flight gate as their reports age out");
}

/// What the queue uses of a report.
fn replica_load(report: &ReplicaCapacity) -> ReplicaLoad {
    ReplicaLoad {
        replica: report.replica.clone(),
        running: report.running,
        waiting: report.waiting,
        max_running: report.max_running,
        heartbeat: Duration::from_millis(report.heartbeat_ms.into()),
    }
}

/// Messages left per model on BATCHES: batches inference has not acked yet.
async fn count_batches(stream: &JsStream) -> Result<HashMap<String, usize>, BusError> {
    let context = || format!("counting {}", Edge::BATCHES.stream);
    let prefix = format!("{}.", Edge::BATCHES.subject);
    let mut subjects =
        stream.info_with_subjects(Edge::BATCHES.filter()).await.map_err(|e| BusError::unavailable(context(), e))?;
    let mut counts = HashMap::new();
    while let Some((subject, count)) = subjects.try_next().await.map_err(|e| BusError::unavailable(context(), e))? {
        if let Some(model) = subject.strip_prefix(&prefix) {
            counts.insert(model.to_owned(), count);
        }
    }
    Ok(counts)
}

async fn count_periodically(stream: JsStream, every: Duration, events: mpsc::UnboundedSender<Event>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let asked_at = Instant::now();
        match count_batches(&stream).await {
            Ok(counts) => {
                if events.send(Event::Counted { counts, asked_at }).is_err() {
                    return;
                }
            }
            // The last count stands meanwhile (batches stay counted: nothing is over-sent).
            Err(e) => warn!(error = %e, "in-flight count failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use millrace_proto::Message as _;
    use millrace_proto::v1::{RequestContext, StageTiming, Timings, Verdict};

    use super::*;

    fn prompt() -> Prompt {
        Prompt {
            ctx: Some(RequestContext { request_id: "r1".into(), model: "m".into(), ..Default::default() }),
            timings: Some(Timings {
                stages: vec![StageTiming { stage: "session".into(), received_unix_us: 1, finished_unix_us: 2 }],
            }),
            prompt: "<|im_start|>user\nHi<|im_end|>\n".into(),
            prompt_tokens: 9,
            user_text: "Hi".into(),
            verdicts: vec![Verdict { stage: "input".into(), action: "allow".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn the_model_comes_from_the_subject_else_the_context() {
        assert_eq!(model_of("mr.v1.prompts.smollm2-135m", "other").as_deref(), Some("smollm2-135m"));
        assert_eq!(model_of("mr.v1.prompts.", "ctx-model").as_deref(), Some("ctx-model"));
        assert_eq!(model_of("elsewhere", "ctx-model").as_deref(), Some("ctx-model"));
        assert_eq!(model_of("mr.v1.prompts", ""), None);
    }

    #[test]
    fn batch_ids_depend_on_the_members_only() {
        let a = batch_id("m", ["r1", "r2", "r3"]);
        assert_eq!(a, batch_id("m", ["r3", "r1", "r2"]), "member order does not matter");
        assert_ne!(a, batch_id("m", ["r1", "r2"]));
        assert_ne!(a, batch_id("other", ["r1", "r2", "r3"]));
        assert_ne!(batch_id("m", ["r1\nr2"]), batch_id("m", ["r1", "r2"]));
    }

    #[test]
    fn dropped_requests_get_their_terminal_result() {
        let out = dropped_result(prompt(), DropReason::Expired, Duration::from_millis(7), 100);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.results.r1", "r1/outcome"));
        let r = TerminalResult::decode(out.payload.as_ref()).unwrap();
        assert_eq!(
            (r.status(), r.reason.as_str(), r.stage.as_str()),
            (TerminalStatus::Expired, "deadline_exceeded", "batcher")
        );
        assert_eq!((r.prompt.as_str(), r.prompt_tokens, r.verdicts.len()), (prompt().prompt.as_str(), 9, 1));
        assert!(r.detail.contains("7 ms"), "{}", r.detail);
        let stages = r.timings.unwrap().stages;
        assert_eq!(stages.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>(), ["session", "batcher"]);
        assert_eq!(stages[1].received_unix_us, 100);
        let r = TerminalResult::decode(
            dropped_result(prompt(), DropReason::Cancelled, Duration::ZERO, 100).payload.as_ref(),
        )
        .unwrap();
        assert_eq!((r.status(), r.reason.as_str(), r.retry_after_ms), (TerminalStatus::Cancelled, "cancelled", 0));
    }

    #[test]
    fn overloaded_requests_are_rate_limited_with_a_retry_hint_rounded_up() {
        let overloaded = |cause, retry_after| {
            let out = dropped_result(prompt(), DropReason::Overloaded { cause, retry_after }, Duration::ZERO, 100);
            assert_eq!(out.msg_id, "r1/outcome");
            TerminalResult::decode(out.payload.as_ref()).unwrap()
        };
        let r = overloaded(Overload::QueueFull, Duration::from_micros(150_001));
        assert_eq!(
            (r.status(), r.reason.as_str(), r.stage.as_str(), r.retry_after_ms),
            (TerminalStatus::RateLimited, "overloaded", "batcher", 151)
        );
        assert!(r.detail.contains("queue is full"), "{}", r.detail);
        assert_eq!(r.prompt_tokens, 9);
        let r = overloaded(Overload::DeadlineUnreachable, Duration::from_millis(400));
        assert_eq!((r.reason.as_str(), r.retry_after_ms), ("overloaded", 400));
        assert!(r.detail.contains("deadline"), "{}", r.detail);
    }
}

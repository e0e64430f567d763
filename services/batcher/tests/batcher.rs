//! The batcher against a real nats-server, run as the deployed binary. The test plays
//! inference: it pulls BATCHES with the `inference` durable, and a batch it has not acked is
//! in flight. Holding batches unacked keeps the model at its in-flight bound, which is how the
//! tests make requests gather deterministically before releasing them (no timing races on
//! which trigger fires).
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::{Edge, ephemeral};
use millrace_bus::{BusSettings, Dedup, Publisher};
use millrace_proto::v1::{Batch, Prompt, ReplicaCapacity, RequestContext, Result as TerminalResult, TerminalStatus};
use millrace_proto::{Message as _, now_unix_ms};
use millrace_testkit::bus::{publisher_with, stream, stream_len, wait_result};
use millrace_testkit::metrics::metric;
use millrace_testkit::{NatsServer, ServiceProcess};

const MODEL: &str = "smollm2-135m";
const WAIT: Duration = Duration::from_secs(15);

struct Batcher {
    process: ServiceProcess,
}

impl Batcher {
    async fn start(nats: &NatsServer, extra: &[&str]) -> Batcher {
        let mut args = vec![format!("--nats-url={}", nats.url())];
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = ServiceProcess::start("batcher", &args, &[], WAIT).await.unwrap();
        Batcher { process }
    }

    /// Starts it again with the same flags minus any fault flags.
    async fn restart_without_faults(&mut self) {
        let args: Vec<String> = self.process.args().iter().filter(|a| !a.starts_with("--fault")).cloned().collect();
        self.process.restart(args, WAIT).await.unwrap();
    }

    async fn metrics(&self) -> String {
        self.process.metrics().await.unwrap()
    }

    /// A metric's value (absent: 0).
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let deadline = Instant::now() + WAIT;
        while self.metric(name, labels).await != value {
            assert!(Instant::now() < deadline, "{name}{labels:?} never reached {value}; log:\n{}", self.process.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_depth(&self, depth: usize) {
        self.wait_metric("millrace_batcher_queue_depth", &[("model", MODEL)], depth as f64).await;
    }

    /// Until the batcher has seen that inference holds nothing of the model.
    async fn wait_idle(&self) {
        self.wait_metric("millrace_batcher_in_flight_batches", &[("model", MODEL)], 0.0).await;
    }
}

/// The test's side of the bus: a publisher and the `inference` pull consumer on BATCHES.
struct Bus {
    publisher: Publisher,
    batches: PullConsumer,
}

impl Bus {
    /// `settings` must match the batcher's bus flags: both provision the consumers.
    async fn connect(nats: &NatsServer, settings: BusSettings) -> Bus {
        let publisher = publisher_with(nats, settings).await;
        let batches = stream(publisher.jetstream(), Edge::BATCHES).await.get_consumer("inference").await.unwrap();
        Bus { publisher, batches }
    }

    async fn publish_prompt(&self, prompt: Prompt) {
        let request_id = prompt.ctx.as_ref().unwrap().request_id.clone();
        self.publisher
            .publish(Outbound {
                subject: Edge::PROMPTS.subject_for(MODEL),
                msg_id: Dedup::Stage("session").msg_id(&request_id),
                payload: prompt.encode_to_vec().into(),
            })
            .await
            .unwrap();
    }

    /// The next batch delivered to inference for the first time (left unacked: in flight).
    async fn next_batch(&self) -> (Batch, jetstream::Message) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no batch within {WAIT:?}");
            let mut messages = self.batches.batch().max_messages(1).expires(left).messages().await.unwrap();
            let Some(message) = messages.next().await else { continue };
            let message = message.unwrap();
            if message.info().unwrap().delivered > 1 {
                continue;
            }
            assert_eq!(message.subject.as_str(), Edge::BATCHES.subject_for(MODEL));
            return (Batch::decode(message.payload.clone()).unwrap(), message);
        }
    }

    /// Batches published and not yet delivered to inference.
    async fn undelivered_batches(&mut self) -> u64 {
        self.batches.info().await.unwrap().num_pending
    }

    async fn result(&self, request_id: &str) -> (String, TerminalResult) {
        wait_result(self.publisher.jetstream(), request_id, WAIT).await
    }

    /// Until the batcher has acked every prompt published to it.
    async fn wait_prompts_acked(&self, batcher: &Batcher) {
        let mut consumer: PullConsumer =
            stream(self.publisher.jetstream(), Edge::PROMPTS).await.get_consumer("batcher").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = consumer.info().await.unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "prompts left unacked: {info:?}; log:\n{}", batcher.process.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn prompt(request_id: &str, priority: i32, tokens: u32) -> Prompt {
    Prompt {
        ctx: Some(RequestContext {
            request_id: request_id.to_owned(),
            model: MODEL.to_owned(),
            priority,
            deadline_unix_ms: now_unix_ms() + 120_000,
            ..Default::default()
        }),
        prompt: format!("<|im_start|>user\n{request_id}<|im_end|>\n"),
        prompt_tokens: tokens,
        user_text: request_id.to_owned(),
        ..Default::default()
    }
}

fn members(batch: &Batch) -> Vec<&str> {
    batch.prompts.iter().map(|p| p.ctx.as_ref().unwrap().request_id.as_str()).collect()
}

#[tokio::test]
async fn dispatch_reasons_priority_order_and_the_in_flight_bound() {
    let nats = NatsServer::start().await.unwrap();
    let flags = ["--max-batch-size=3", "--max-batch-tokens=250", "--max-wait-ms=1000", "--max-in-flight=1"];
    let batcher = Batcher::start(&nats, &flags).await;
    let mut bus = Bus::connect(&nats, BusSettings::default()).await;

    // Nothing in flight: the first request goes at once, alone.
    bus.publish_prompt(prompt("first", 0, 10)).await;
    let (b1, m1) = bus.next_batch().await;
    assert_eq!((b1.dispatch_reason.as_str(), members(&b1)), ("idle", vec!["first"]));
    assert_eq!(b1.model, MODEL);
    let stages = &b1.prompts[0].timings.as_ref().unwrap().stages;
    assert_eq!(stages.last().unwrap().stage, "batcher");

    // At the bound (one batch in flight): requests gather, whatever their triggers say.
    for (id, priority) in [("l1", 0), ("l2", 0), ("h1", 5), ("l3", 0), ("h2", 5)] {
        bus.publish_prompt(prompt(id, priority, 10)).await;
    }
    batcher.wait_depth(5).await;
    let gathered = Instant::now();
    assert_eq!(bus.undelivered_batches().await, 0, "nothing dispatched while at the bound");

    // The slot frees: a full batch, higher priority first, arrival order within a priority.
    m1.double_ack().await.unwrap();
    let (b2, m2) = bus.next_batch().await;
    assert_eq!((b2.dispatch_reason.as_str(), members(&b2)), ("size", vec!["h1", "h2", "l1"]));
    batcher.wait_depth(2).await;

    // The other two have waited past max_wait by the time the next slot frees.
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(gathered.elapsed())).await;
    m2.double_ack().await.unwrap();
    let (b3, m3) = bus.next_batch().await;
    assert_eq!((b3.dispatch_reason.as_str(), members(&b3)), ("wait", vec!["l2", "l3"]));

    // Token budget: 150 + 100 reaches the 250 budget before the size of 3.
    m3.double_ack().await.unwrap();
    batcher.wait_idle().await;
    bus.publish_prompt(prompt("hold", 0, 10)).await;
    let (b4, m4) = bus.next_batch().await;
    assert_eq!((b4.dispatch_reason.as_str(), members(&b4)), ("idle", vec!["hold"]));
    bus.publish_prompt(prompt("t1", 0, 150)).await;
    bus.publish_prompt(prompt("t2", 0, 100)).await;
    batcher.wait_depth(2).await;
    m4.double_ack().await.unwrap();
    let (b5, m5) = bus.next_batch().await;
    assert_eq!((b5.dispatch_reason.as_str(), members(&b5)), ("tokens", vec!["t1", "t2"]));
    m5.double_ack().await.unwrap();

    bus.wait_prompts_acked(&batcher).await;
    let text = batcher.metrics().await;
    for (reason, count) in [("idle", 2.0), ("size", 1.0), ("wait", 1.0), ("tokens", 1.0)] {
        let labels = [("model", MODEL), ("reason", reason)];
        assert_eq!(metric(&text, "millrace_batcher_dispatches_total", &labels), Some(count), "{reason}");
    }
    assert_eq!(metric(&text, "millrace_batcher_batch_size_count", &[("model", MODEL)]), Some(5.0));
    assert_eq!(metric(&text, "millrace_batcher_batch_size_sum", &[("model", MODEL)]), Some(9.0));
    assert_eq!(metric(&text, "millrace_batcher_batch_tokens_sum", &[("model", MODEL)]), Some(320.0));
    assert_eq!(metric(&text, "millrace_batcher_queue_wait_seconds_count", &[("model", MODEL)]), Some(9.0));
}

/// `--nats-url` takes a comma-separated list (a cluster's nodes): the batcher starts, becomes
/// ready and batches through the live server when the first URL is dead.
#[tokio::test]
async fn a_url_list_whose_first_server_is_dead_reaches_the_next() {
    let nats = NatsServer::start().await.unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let args = [format!("--nats-url=nats://127.0.0.1:{dead},{}", nats.url()), "--max-in-flight=1".to_owned()];
    let process = ServiceProcess::start("batcher", &args, &[], WAIT).await.expect("ready past the dead URL");
    let batcher = Batcher { process };
    let bus = Bus::connect(&nats, BusSettings::default()).await;
    bus.publish_prompt(prompt("listed", 0, 10)).await;
    let (batch, message) = bus.next_batch().await;
    assert_eq!(members(&batch), ["listed"]);
    message.double_ack().await.unwrap();
    bus.wait_prompts_acked(&batcher).await;
}

/// A queued prompt holds its message's ack handle, not a consumer worker: one worker still
/// gathers a full batch (the worker count used to cap the batch size).
#[tokio::test]
async fn one_worker_fills_a_batch_larger_than_one() {
    let nats = NatsServer::start().await.unwrap();
    let flags = ["--workers=1", "--max-batch-size=4", "--max-wait-ms=60000", "--max-in-flight=1"];
    let batcher = Batcher::start(&nats, &flags).await;
    let bus = Bus::connect(&nats, BusSettings { workers: 1, ..BusSettings::default() }).await;

    bus.publish_prompt(prompt("first", 0, 10)).await;
    let (b1, m1) = bus.next_batch().await;
    assert_eq!(members(&b1), ["first"]);
    for id in ["a", "b", "c", "d"] {
        bus.publish_prompt(prompt(id, 0, 10)).await;
    }
    batcher.wait_depth(4).await;
    m1.double_ack().await.unwrap();
    let (b2, m2) = bus.next_batch().await;
    assert_eq!((b2.dispatch_reason.as_str(), members(&b2)), ("size", vec!["a", "b", "c", "d"]));
    m2.double_ack().await.unwrap();
    bus.wait_prompts_acked(&batcher).await;
}

#[tokio::test]
async fn expired_and_cancelled_requests_get_their_result_and_no_batch() {
    let nats = NatsServer::start().await.unwrap();
    let batcher = Batcher::start(&nats, &["--max-in-flight=1", "--max-wait-ms=60000"]).await;
    let bus = Bus::connect(&nats, BusSettings::default()).await;
    let client = bus.publisher.client();

    // Past its deadline on arrival.
    let mut expired = prompt("expired", 0, 10);
    expired.ctx.as_mut().unwrap().deadline_unix_ms = now_unix_ms() - 1_000;
    bus.publish_prompt(expired).await;
    let (id, r) = bus.result("expired").await;
    assert_eq!(id, "expired/outcome");
    assert_eq!(
        (r.status(), r.reason.as_str(), r.stage.as_str()),
        (TerminalStatus::Expired, "deadline_exceeded", "batcher")
    );
    assert_eq!((r.prompt_tokens, r.ctx.unwrap().request_id.as_str()), (10, "expired"));

    // Cancelled before it arrived: the notice is remembered.
    client.publish(ephemeral::cancel("early"), "".into()).await.unwrap();
    batcher.wait_metric("millrace_batcher_cancel_notices_total", &[], 1.0).await;
    bus.publish_prompt(prompt("early", 0, 10)).await;
    let (id, r) = bus.result("early").await;
    assert_eq!(id, "early/outcome");
    assert_eq!((r.status(), r.reason.as_str(), r.stage.as_str()), (TerminalStatus::Cancelled, "cancelled", "batcher"));

    // Cancelled while queued (held behind the in-flight bound).
    bus.publish_prompt(prompt("hold", 0, 10)).await;
    let (b1, m1) = bus.next_batch().await;
    assert_eq!(members(&b1), ["hold"]);
    bus.publish_prompt(prompt("queued", 0, 10)).await;
    batcher.wait_depth(1).await;
    client.publish(ephemeral::cancel("queued"), "".into()).await.unwrap();
    let (_, r) = bus.result("queued").await;
    assert_eq!((r.status(), r.reason.as_str()), (TerminalStatus::Cancelled, "cancelled"));
    batcher.wait_depth(0).await;

    // Once the slot frees, the next batch holds only the next request.
    m1.double_ack().await.unwrap();
    batcher.wait_idle().await;
    bus.publish_prompt(prompt("after", 0, 10)).await;
    let (b2, m2) = bus.next_batch().await;
    assert_eq!((b2.dispatch_reason.as_str(), members(&b2)), ("idle", vec!["after"]));
    m2.double_ack().await.unwrap();

    bus.wait_prompts_acked(&batcher).await;
    let text = batcher.metrics().await;
    let dropped = |reason| metric(&text, "millrace_batcher_dropped_total", &[("model", MODEL), ("reason", reason)]);
    assert_eq!((dropped("expired"), dropped("cancelled")), (Some(1.0), Some(2.0)));
    assert_eq!(metric(&text, "millrace_batcher_dispatches_total", &[("reason", "idle")]), Some(2.0));
}

/// A crash after a batch's PubAck and before its prompts are acked redelivers the prompts;
/// they form the same batch again (same members → same batch id) and the stream drops it as a
/// duplicate: inference sees each request once. (Were they grouped differently, a request
/// would be in two batches and inference's `<request_id>/inference` ids would keep one output;
/// this test pins the stronger property, which holds when the same requests are redelivered.)
#[tokio::test]
async fn a_crash_between_publish_and_ack_completes_no_request_twice() {
    let nats = NatsServer::start().await.unwrap();
    // Quick redelivery of the prompts the crash leaves unacked.
    let settings = BusSettings { ack_wait_s: 1, ..Default::default() };
    let mut bus = Bus::connect(&nats, settings).await;
    // Two batches already in flight (another replica's, say): the batcher starts at the bound.
    for blocker in ["blocker-1", "blocker-2"] {
        let batch = Batch { batch_id: blocker.to_owned(), model: MODEL.to_owned(), ..Default::default() };
        bus.publisher.publish(Outbound::batch(&batch)).await.unwrap();
    }
    let flags = [
        "--ack-wait-s=1",
        "--max-batch-size=4",
        "--max-wait-ms=60000",
        "--max-in-flight=2",
        "--fault-abort-after-publish",
    ];
    let mut batcher = Batcher::start(&nats, &flags).await;
    let ids = ["c1", "c2", "c3", "c4"];
    for id in ids {
        bus.publish_prompt(prompt(id, 0, 10)).await;
    }
    batcher.wait_depth(4).await;
    assert_eq!(bus.undelivered_batches().await, 2, "only the blockers");

    // Inference finishes the blockers: the four go as one batch, and the batcher dies right
    // after its PubAck.
    for _ in 0..2 {
        let (blocker, m) = bus.next_batch().await;
        assert!(blocker.batch_id.starts_with("blocker-"));
        m.double_ack().await.unwrap();
    }
    let status = batcher.process.wait_exit(WAIT).await.unwrap();
    assert!(!status.success(), "the fault aborts the batcher: {status:?}");
    let (batch, _in_flight) = bus.next_batch().await;
    assert_eq!(batch.dispatch_reason, "size");
    let mut got = members(&batch);
    got.sort_unstable();
    assert_eq!(got, ids, "every request is in the batch, once");

    // Restarted, the batcher gets the four prompts again, batches them again (still one batch
    // in flight: no idle dispatch of a partial batch) and the stream drops the copy.
    batcher.restart_without_faults().await;
    bus.wait_prompts_acked(&batcher).await;
    let duplicates = [("stream", Edge::BATCHES.stream)];
    assert_eq!(
        batcher.metric("millrace_publish_duplicates_total", &duplicates).await,
        1.0,
        "re-formed and deduplicated"
    );
    let labels = [("model", MODEL), ("reason", "size")];
    assert_eq!(batcher.metric("millrace_batcher_dispatches_total", &labels).await, 1.0);
    assert_eq!(bus.undelivered_batches().await, 0, "no second batch reached inference");
    assert_eq!(stream_len(bus.publisher.jetstream(), Edge::BATCHES).await, 1, "BATCHES holds the batch once");
}

/// SIGTERM while requests wait: they are handed back (not lost, not acked) and batched by the
/// next batcher.
#[tokio::test]
async fn draining_hands_queued_prompts_back() {
    let nats = NatsServer::start().await.unwrap();
    let flags = ["--max-in-flight=1", "--max-wait-ms=60000"];
    let mut batcher = Batcher::start(&nats, &flags).await;
    let bus = Bus::connect(&nats, BusSettings::default()).await;
    bus.publish_prompt(prompt("hold", 0, 10)).await;
    let (_, m1) = bus.next_batch().await;
    bus.publish_prompt(prompt("waiting", 0, 10)).await;
    batcher.wait_depth(1).await;
    let status = batcher.process.terminate(WAIT).await.unwrap();
    assert!(status.success(), "drains cleanly: {status:?}; log:\n{}", batcher.process.logs());

    m1.double_ack().await.unwrap();
    let batcher = Batcher::start(&nats, &flags).await;
    let (b2, m2) = bus.next_batch().await;
    assert_eq!((b2.dispatch_reason.as_str(), members(&b2)), ("idle", vec!["waiting"]));
    m2.double_ack().await.unwrap();
    bus.wait_prompts_acked(&batcher).await;
}

/// Publishes an inference replica's load report of `MODEL` on core NATS.
async fn publish_report(client: &async_nats::Client, report: ReplicaCapacity) {
    client.publish(ephemeral::capacity(MODEL), report.encode_to_vec().into()).await.unwrap();
    client.flush().await.unwrap();
}

/// Replica `r1` of `MODEL` with `running` of 4 sequences running.
fn report(running: u32) -> ReplicaCapacity {
    ReplicaCapacity {
        replica: "r1".to_owned(),
        model: MODEL.to_owned(),
        running,
        waiting: 0,
        max_running: 4,
        kv_budget_tokens: 4096,
        kv_used_tokens: 100 * u64::from(running),
        prefix_cache_tokens: 7,
        sent_unix_ms: now_unix_ms(),
        heartbeat_ms: 60_000,
    }
}

/// With capacity reports the batcher schedules: it holds prompts back while the model's replicas
/// have no free slot, whatever the fallback gate would do, and lets out exactly the slots
/// reported free, at once, highest priority first and earliest deadline first within a
/// priority. A full queue refuses at once.
#[tokio::test]
async fn capacity_reports_let_out_exactly_the_free_slots_in_priority_and_deadline_order() {
    let nats = NatsServer::start().await.unwrap();
    let batcher = Batcher::start(&nats, &["--max-queue=5"]).await;
    let mut bus = Bus::connect(&nats, BusSettings::default()).await;
    let client = bus.publisher.client();
    let replica = [("model", MODEL), ("replica", "r1")];

    // Every slot taken.
    publish_report(&client, report(4)).await;
    batcher.wait_metric("millrace_batcher_replica_running", &replica, 4.0).await;
    for (id, priority, deadline_s) in
        [("l-120", 0, 120), ("l-60", 0, 60), ("h-120", 5, 120), ("l-none", 0, 0), ("h-30", 5, 30)]
    {
        let mut p = prompt(id, priority, 10);
        p.ctx.as_mut().unwrap().deadline_unix_ms = if deadline_s == 0 { 0 } else { now_unix_ms() + deadline_s * 1000 };
        bus.publish_prompt(p).await;
    }
    batcher.wait_depth(5).await;
    // Without the report the first would have gone at once (idle), the rest after max_wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bus.undelivered_batches().await, 0, "held back: no free slot");
    let text = batcher.metrics().await;
    assert_eq!(metric(&text, "millrace_batcher_free_slots", &[("model", MODEL)]), Some(0.0));
    assert_eq!(metric(&text, "millrace_batcher_queue_depth", &[("model", MODEL), ("priority", "5")]), Some(2.0));

    // The queue holds --max-queue requests: the next is refused at once.
    bus.publish_prompt(prompt("refused", 0, 10)).await;
    let (id, r) = bus.result("refused").await;
    assert_eq!(id, "refused/outcome");
    assert_eq!(
        (r.status(), r.reason.as_str(), r.stage.as_str()),
        (TerminalStatus::RateLimited, "overloaded", "batcher")
    );
    assert!(r.retry_after_ms >= 100, "{r:?}");

    // Three slots free: exactly three go, at once, in priority then deadline order.
    let reported = Instant::now();
    publish_report(&client, report(1)).await;
    let (b1, m1) = bus.next_batch().await;
    assert!(reported.elapsed() < Duration::from_secs(2), "promptly: {:?}", reported.elapsed());
    assert_eq!((b1.dispatch_reason.as_str(), members(&b1)), ("capacity", vec!["h-30", "h-120", "l-60"]));
    batcher.wait_depth(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bus.undelivered_batches().await, 0, "no more than the free slots");

    // The replica's next report (its three new sequences admitted, two finished): two free.
    publish_report(&client, report(2)).await;
    let (b2, m2) = bus.next_batch().await;
    assert_eq!((b2.dispatch_reason.as_str(), members(&b2)), ("capacity", vec!["l-120", "l-none"]));
    m1.double_ack().await.unwrap();
    m2.double_ack().await.unwrap();

    bus.wait_prompts_acked(&batcher).await;
    let text = batcher.metrics().await;
    let capacity = [("model", MODEL), ("reason", "capacity")];
    assert_eq!(metric(&text, "millrace_batcher_dispatches_total", &capacity), Some(2.0));
    assert_eq!(metric(&text, "millrace_batcher_dispatches_total", &[("model", MODEL)]), Some(2.0));
    let full = [("model", MODEL), ("reason", "queue_full")];
    assert_eq!(metric(&text, "millrace_batcher_refused_total", &full), Some(1.0));
    assert_eq!(metric(&text, "millrace_batcher_replica_free_slots", &replica), Some(2.0));
    assert_eq!(metric(&text, "millrace_batcher_replica_kv_used_tokens", &replica), Some(200.0));
    assert_eq!(metric(&text, "millrace_batcher_replica_prefix_cache_tokens", &replica), Some(7.0));
    assert_eq!(
        metric(&text, "millrace_batcher_queue_wait_seconds_count", &[("model", MODEL), ("tenant", "")]),
        Some(5.0)
    );
}

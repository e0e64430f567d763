//! The bus against a real nats-server: dedup, ack after effect, nak and redelivery, DLQ on
//! max deliveries.
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use millrace_bus::dlq::MaxDeliveriesListener;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::{ConsumerSpec, Edge};
use millrace_bus::{BusSettings, Dedup, Delivery, Handler, Publisher, StageConsumer, StageError, Topology};
use millrace_proto::Message as _;
use millrace_proto::v1::{Batch, DlqRecord, Prompt, Query, RequestContext, TerminalStatus};
use millrace_testkit::NatsServer;
use millrace_testkit::bus::{publisher_with, result, stream, stream_len, wait_result};
use tokio_util::sync::CancellationToken;

fn query(request_id: &str) -> Outbound {
    let q = Query {
        ctx: Some(RequestContext { request_id: request_id.into(), ..Default::default() }),
        text: "hi".into(),
        ..Default::default()
    };
    Outbound {
        subject: Edge::QUERIES.subject_for(""),
        msg_id: Dedup::Stage("ingest").msg_id(request_id),
        payload: q.encode_to_vec().into(),
    }
}

#[tokio::test]
async fn the_same_msg_id_twice_is_stored_once() {
    let nats = NatsServer::start().await.unwrap();
    let publisher = publisher_with(&nats, BusSettings::default()).await;
    let first = publisher.publish(query("r1")).await.unwrap();
    let second = publisher.publish(query("r1")).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.sequence, second.sequence);
    assert_eq!(stream_len(publisher.jetstream(), Edge::QUERIES).await, 1);
}

#[tokio::test]
async fn provisioning_twice_and_concurrently_is_idempotent() {
    let nats = NatsServer::start().await.unwrap();
    let publisher = publisher_with(&nats, BusSettings::default()).await;
    let topology = Topology::mesh(&BusSettings { nats_url: nats.url(), ..Default::default() });
    let (a, b) = tokio::join!(topology.provision(publisher.jetstream()), topology.provision(publisher.jetstream()));
    a.unwrap();
    b.unwrap();
    let names: Vec<String> = publisher.jetstream().stream_names().map(Result::unwrap).collect().await;
    let edges = names.iter().filter(|n| n.starts_with("MR_")).count();
    assert_eq!(edges, Edge::ALL.len(), "{names:?}");
    let ledger = ["KV_MR_IDEMPOTENCY", "KV_MR_OUTCOMES"];
    assert!(ledger.iter().all(|l| names.iter().any(|n| n == l)), "the ledger's buckets: {names:?}");
}

/// Forwards queries to CLEAN, failing transiently on each message's first delivery if `flaky`.
struct FlakyRelay {
    publisher: Publisher,
    calls: AtomicU32,
    flaky: bool,
    /// The most deliveries any message had when handled.
    most_deliveries: AtomicU32,
}

impl FlakyRelay {
    fn new(publisher: &Publisher, flaky: bool) -> Arc<Self> {
        let (calls, most_deliveries) = (AtomicU32::new(0), AtomicU32::new(0));
        Arc::new(Self { publisher: publisher.clone(), calls, flaky, most_deliveries })
    }
}

impl Handler for FlakyRelay {
    async fn handle(&self, d: &Delivery) -> Result<(), StageError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.most_deliveries.fetch_max(d.deliveries as u32, Ordering::SeqCst);
        if self.flaky && d.deliveries == 1 {
            return Err(StageError::transient("first try fails", Duration::from_millis(50)));
        }
        let q: Query = d.decode()?;
        let id = q.ctx.unwrap().request_id;
        self.publisher
            .publish(Outbound {
                subject: Edge::CLEAN.subject_for(""),
                msg_id: Dedup::Stage("relay").msg_id(&id),
                payload: d.payload.clone(),
            })
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn transient_failures_are_naked_redelivered_and_acked_after_the_effect() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), ..Default::default() };
    let publisher = publisher_with(&nats, settings.clone()).await;
    let relay = FlakyRelay::new(&publisher, true);
    let consumer = StageConsumer::new(ConsumerSpec::PREPROCESS, relay.clone(), publisher.clone(), settings);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop, || ()).await }
    });
    let outs: Vec<_> = (0..20).map(|i| query(&format!("q{i}"))).collect();
    publisher.publish_all(outs).await.unwrap();
    for _ in 0..200 {
        if stream_len(publisher.jetstream(), Edge::CLEAN).await == 20
            && stream_len(publisher.jetstream(), Edge::QUERIES).await == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stream_len(publisher.jetstream(), Edge::CLEAN).await, 20);
    // Interest retention: acked inputs leave the stream.
    assert_eq!(stream_len(publisher.jetstream(), Edge::QUERIES).await, 0);
    assert_eq!(relay.calls.load(Ordering::SeqCst), 40, "each message once naked, once handled");
    stop.cancel();
    running.await.unwrap().unwrap();
}

/// A full next edge holds the message (in-progress acks) instead of naking it, so an outage
/// longer than the retry horizon uses up no delivery and dead-letters nothing.
#[tokio::test]
async fn a_full_next_edge_holds_messages_without_spending_their_deliveries() {
    let nats = NatsServer::start().await.unwrap();
    let settings =
        BusSettings { nats_url: nats.url(), max_deliver: 2, ack_wait_s: 1, stream_max_msgs: 2, ..Default::default() };
    let publisher = publisher_with(&nats, settings.clone()).await;
    let js = publisher.jetstream().clone();
    // CLEAN is full: its reader is not running.
    let fillers = (0..2).map(|i| Outbound { subject: Edge::CLEAN.subject_for(""), ..query(&format!("filler{i}")) });
    publisher.publish_all(fillers).await.unwrap();
    let relay = FlakyRelay::new(&publisher, false);
    let consumer = StageConsumer::new(ConsumerSpec::PREPROCESS, relay.clone(), publisher.clone(), settings);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop, || ()).await }
    });
    publisher.publish_all([query("held-1"), query("held-2")]).await.unwrap();
    // Past the retry horizon of 1 + 2 s: naked, they would have been dead-lettered by now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(stream_len(&js, Edge::QUERIES).await, 2, "held, not acked");
    assert!(relay.calls.load(Ordering::SeqCst) > 2, "tried again while held");
    stream(&js, Edge::CLEAN).await.purge().await.unwrap();
    for _ in 0..100 {
        if stream_len(&js, Edge::QUERIES).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stream_len(&js, Edge::CLEAN).await, 2, "both went through once there was room");
    assert_eq!(stream_len(&js, Edge::QUERIES).await, 0);
    assert_eq!(stream_len(&js, Edge::DLQ).await, 0, "nothing dead-lettered");
    assert_eq!(relay.most_deliveries.load(Ordering::SeqCst), 1, "never redelivered");
    stop.cancel();
    running.await.unwrap().unwrap();
}

struct AlwaysFails;

impl Handler for AlwaysFails {
    async fn handle(&self, _: &Delivery) -> Result<(), StageError> {
        Err(StageError::transient("never works", Duration::from_millis(10)))
    }
}

#[tokio::test]
async fn a_message_out_of_deliveries_is_dead_lettered_with_a_failed_result() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), max_deliver: 3, ack_wait_s: 1, ..Default::default() };
    let publisher = publisher_with(&nats, settings.clone()).await;
    let consumer = StageConsumer::new(ConsumerSpec::PREPROCESS, Arc::new(AlwaysFails), publisher.clone(), settings);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop, || ()).await }
    });
    // Give the advisory subscription a moment before the message can exhaust its deliveries.
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.publish(query("doomed")).await.unwrap();

    let record = expect_dead_letter(&publisher, "doomed").await;
    assert_eq!(record.deliveries, 3);
    stop.cancel();
    running.await.unwrap().unwrap();
}

/// Waits for the DLQ record and the FAILED result of `request_id`.
async fn expect_dead_letter(publisher: &Publisher, request_id: &str) -> DlqRecord {
    let js = publisher.jetstream();
    let dlq = stream(js, Edge::DLQ).await;
    let mut seen = None;
    for _ in 0..150 {
        if let Ok(m) = dlq.get_last_raw_message_by_subject("mr.v1.dlq.preprocess").await {
            seen = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let record = DlqRecord::decode(seen.expect("a DLQ record").payload).unwrap();
    assert_eq!(record.request_id, request_id);
    assert_eq!(record.reason, "max_deliveries");
    let (_, result) = result(js, request_id).await.expect("a FAILED result");
    assert_eq!(result.status, TerminalStatus::Failed as i32);
    assert_eq!(result.ctx.unwrap().request_id, request_id);
    record
}

#[tokio::test]
async fn a_message_whose_workers_keep_dying_is_dead_lettered_from_the_advisory() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), max_deliver: 2, ack_wait_s: 1, ..Default::default() };
    let publisher = publisher_with(&nats, settings).await;
    let stop = CancellationToken::new();
    let listener = MaxDeliveriesListener::new(ConsumerSpec::PREPROCESS, publisher.clone());
    let listening = tokio::spawn(listener.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    publisher.publish(query("orphan")).await.unwrap();
    // A worker that takes the message and dies without acking, every time.
    let consumer: PullConsumer =
        stream(publisher.jetstream(), Edge::QUERIES).await.get_consumer("preprocess").await.unwrap();
    let mut taken = 0;
    for _ in 0..6 {
        let mut batch = consumer.fetch().max_messages(1).expires(Duration::from_secs(2)).messages().await.unwrap();
        while let Some(m) = batch.next().await {
            m.unwrap();
            taken += 1;
        }
        if taken == 2 {
            break;
        }
    }
    assert_eq!(taken, 2);
    // Keep a pull waiting so the server tries a third delivery and gives up.
    let _ = consumer.fetch().max_messages(1).expires(Duration::from_secs(3)).messages().await.unwrap().next().await;
    let record = expect_dead_letter(&publisher, "orphan").await;
    assert_eq!(record.deliveries, 2);
    stop.cancel();
    listening.await.unwrap().unwrap();
}

/// Takes three ack-waits per message.
struct Slow {
    calls: AtomicU32,
}

impl Handler for Slow {
    async fn handle(&self, _: &Delivery) -> Result<(), StageError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    }
}

#[tokio::test]
async fn long_work_sends_in_progress_and_is_not_redelivered_meanwhile() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), ack_wait_s: 1, ..Default::default() };
    let publisher = publisher_with(&nats, settings.clone()).await;
    let slow = Arc::new(Slow { calls: AtomicU32::new(0) });
    let consumer = StageConsumer::new(ConsumerSpec::PREPROCESS, slow.clone(), publisher.clone(), settings);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop, || ()).await }
    });
    publisher.publish(query("long")).await.unwrap();
    for _ in 0..100 {
        if stream_len(publisher.jetstream(), Edge::QUERIES).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stream_len(publisher.jetstream(), Edge::QUERIES).await, 0, "acked once done");
    assert_eq!(slow.calls.load(Ordering::SeqCst), 1, "never redelivered while in progress");
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_dead_batch_ends_every_member_request() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), max_deliver: 2, ack_wait_s: 1, ..Default::default() };
    let publisher = publisher_with(&nats, settings.clone()).await;
    let consumer = StageConsumer::new(ConsumerSpec::INFERENCE, Arc::new(AlwaysFails), publisher.clone(), settings);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop, || ()).await }
    });
    let member = |id: &str| Prompt {
        ctx: Some(RequestContext { request_id: id.into(), ..Default::default() }),
        ..Default::default()
    };
    let batch = Batch {
        batch_id: "b1".into(),
        model: "m".into(),
        prompts: vec![member("r1"), member("r2")],
        ..Default::default()
    };
    publisher.publish(Outbound::batch(&batch)).await.unwrap();
    let js = publisher.jetstream();
    for id in ["r1", "r2"] {
        let (_, result) = wait_result(js, id, Duration::from_secs(10)).await;
        assert_eq!((result.status, result.reason.as_str()), (TerminalStatus::Failed as i32, "max_deliveries"));
    }
    // No row for the batch itself: its DLQ record names no request.
    let dlq = stream(js, Edge::DLQ).await;
    let record =
        DlqRecord::decode(dlq.get_last_raw_message_by_subject("mr.v1.dlq.inference").await.unwrap().payload).unwrap();
    assert!(record.ctx.is_none());
    assert!(result(js, "b1").await.is_none());
    stop.cancel();
    running.await.unwrap().unwrap();
}

//! Consumer lag gauges against a real nats-server: they follow messages published and not yet
//! consumed, then delivered and not yet acked, and disappear when their consumer stops.
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use millrace_bus::lag::LagExport;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::{ConsumerSpec, Edge};
use millrace_bus::{BusSettings, Dedup, Delivery, Handler, StageConsumer, StageError};
use millrace_proto::Message as _;
use millrace_proto::v1::{Query, RequestContext};
use millrace_testkit::NatsServer;
use millrace_testkit::bus::{publisher_with, stream};
use millrace_testkit::metrics::metric;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const POLL: Duration = Duration::from_millis(50);

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

/// This process's metrics as `/metrics` serves them.
fn exported() -> String {
    prometheus::TextEncoder::new().encode_to_string(&prometheus::gather()).expect("metrics encode")
}

/// The (pending, ack pending) gauges of `spec`, as exported.
fn lag(spec: ConsumerSpec) -> (Option<f64>, Option<f64>) {
    let text = exported();
    let labels = [("stream", spec.edge.stream), ("consumer", spec.durable)];
    (
        metric(&text, "millrace_consumer_pending_messages", &labels),
        metric(&text, "millrace_consumer_ack_pending_messages", &labels),
    )
}

async fn wait_lag(spec: ConsumerSpec, want: (Option<f64>, Option<f64>)) {
    wait_lag_until(spec, &format!("{want:?}"), |lag| lag == want).await;
}

/// Waits until `spec`'s (pending, ack pending) satisfies `expected`, described by `what`.
async fn wait_lag_until(spec: ConsumerSpec, what: &str, expected: impl Fn((Option<f64>, Option<f64>)) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !expected(lag(spec)) {
        assert!(Instant::now() < deadline, "lag of {} is {:?}, expected {what}", spec.durable, lag(spec));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_gauges_follow_unconsumed_then_unacked_messages_and_vanish_on_drop() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), ..Default::default() };
    let publisher = publisher_with(&nats, settings).await;
    let spec = ConsumerSpec::PREPROCESS;
    let consumer: PullConsumer =
        stream(publisher.jetstream(), spec.edge).await.get_consumer(spec.durable).await.unwrap();
    let export = LagExport::spawn(consumer.clone(), spec, POLL);
    wait_lag(spec, (Some(0.0), Some(0.0))).await;

    publisher.publish_all((0..5).map(|i| query(&format!("q{i}")))).await.unwrap();
    wait_lag(spec, (Some(5.0), Some(0.0))).await;

    // Two delivered and held: no longer pending, not yet acked.
    let mut held: Vec<_> =
        consumer.fetch().max_messages(2).messages().await.unwrap().map(|m| m.unwrap()).collect::<Vec<_>>().await;
    assert_eq!(held.len(), 2);
    wait_lag(spec, (Some(3.0), Some(2.0))).await;

    for message in held.drain(..) {
        message.double_ack().await.unwrap();
    }
    wait_lag(spec, (Some(3.0), Some(0.0))).await;

    drop(export);
    assert_eq!(lag(spec), (None, None), "a stopped export leaves no stale series");
}

/// Takes one permit per message, so the test decides when each may finish.
struct Gated(Arc<Semaphore>);

impl Handler for Gated {
    async fn handle(&self, _: &Delivery) -> Result<(), StageError> {
        self.0.acquire().await.expect("gate open").forget();
        Ok(())
    }
}

#[tokio::test]
async fn a_running_stage_consumer_exports_its_lag_until_it_stops() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), workers: 2, ..Default::default() };
    let publisher = publisher_with(&nats, settings.clone()).await;
    let spec = ConsumerSpec::SINK_DLQ;
    let gate = Arc::new(Semaphore::new(0));
    let mut stage = StageConsumer::new(spec, Gated(gate.clone()), publisher.clone(), settings);
    stage.lag_poll = POLL;
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { stage.run(stop, || ()).await }
    });
    wait_lag(spec, (Some(0.0), Some(0.0))).await;

    let dead = (0..4).map(|i| Outbound {
        subject: Edge::DLQ.subject_for("test"),
        msg_id: Dedup::Stage("test").msg_id(&format!("d{i}")),
        payload: Vec::new().into(),
    });
    publisher.publish_all(dead).await.unwrap();
    // Two workers hold two; the rest wait on the stream or in the client's pull buffer (which
    // counts as ack pending).
    wait_lag_until(spec, "at least 2 held of 4", |lag| match lag {
        (Some(pending), Some(ack_pending)) => ack_pending >= 2.0 && pending + ack_pending == 4.0,
        _ => false,
    })
    .await;

    gate.add_permits(4);
    wait_lag(spec, (Some(0.0), Some(0.0))).await;

    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(lag(spec), (None, None), "a stopped consumer leaves no stale series");
}

//! Bus benchmark against a real nats-server (file storage): publish throughput with PubAcks
//! awaited one by one vs pipelined, and a consume → publish → ack relay hop (max rate, and
//! p50/p99 latency at a fixed open-loop rate). Prints a table.
//!
//! `cargo bench -p millrace-bus --bench bus` (MILLRACE_BENCH_N scales the message counts).
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::{ConsumerSpec, Edge};
use millrace_bus::{BusSettings, Delivery, Handler, Publisher, StageConsumer, StageError, msg_id};
use millrace_proto::v1::{Query, RequestContext, Timings};
use millrace_proto::{Message as _, now_unix_us};
use millrace_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const PAYLOAD_BYTES: usize = 300;

fn message(i: usize) -> Outbound {
    let mut timings = Timings::default();
    timings.stages.push(Default::default());
    timings.stages[0].received_unix_us = now_unix_us();
    let mut q = Query { ctx: Some(RequestContext { request_id: format!("b{i}"), ..Default::default() }), timings: Some(timings), text: String::new() };
    q.text = "x".repeat(PAYLOAD_BYTES.saturating_sub(q.encoded_len()));
    Outbound { subject: Edge::QUERIES.subject_for(""), msg_id: msg_id(&format!("b{i}"), "bench"), payload: q.encode_to_vec().into() }
}

async fn fresh(settings: &BusSettings) -> (NatsServer, Publisher, BusSettings) {
    let nats = NatsServer::start().await.expect("nats-server");
    let settings = BusSettings { nats_url: nats.url(), ..settings.clone() };
    let publisher = millrace_bus::connect_mesh(&settings, "bench").await.unwrap();
    (nats, publisher, settings)
}

async fn publish_awaiting_each(publisher: &Publisher, n: usize) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        publisher.publish(message(i)).await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn publish_pipelined(publisher: &Publisher, n: usize) -> f64 {
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1024) {
        publisher.publish_all(chunk.iter().map(|&i| message(i)).collect::<Vec<_>>()).await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// The hop under test: QUERIES → (this stage) → CLEAN, acked after the PubAck.
struct Relay {
    publisher: Publisher,
}

impl Handler for Relay {
    async fn handle(&self, d: &Delivery) -> Result<(), StageError> {
        let id = d.request_id().unwrap_or_default();
        self.publisher
            .publish(Outbound { subject: Edge::CLEAN.subject_for(""), msg_id: msg_id(&id, "relay"), payload: d.payload.clone() })
            .await?;
        Ok(())
    }
}

struct HopResult {
    rate: f64,
    latency: Histogram<u64>,
}

/// Runs the relay; sends `n` messages at `rate`/s (open loop; None = all at once) and measures
/// each one's publish → arrival-at-CLEAN latency.
async fn relay_hop(settings: &BusSettings, n: usize, rate: Option<f64>) -> HopResult {
    let (_nats, publisher, settings) = fresh(settings).await;
    let stop = CancellationToken::new();
    let relay = StageConsumer::new("relay", ConsumerSpec::PREPROCESS, Arc::new(Relay { publisher: publisher.clone() }), publisher.clone(), settings);
    let relaying = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop, || ()).await }
    });
    let downstream: async_nats::jetstream::consumer::PullConsumer =
        publisher.jetstream().get_stream("MR_CLEAN").await.unwrap().get_consumer("moderation-input").await.unwrap();
    let mut arrivals = downstream.stream().max_messages_per_batch(512).messages().await.unwrap();
    let receiving = tokio::spawn(async move {
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for _ in 0..n {
            let m = arrivals.next().await.unwrap().unwrap();
            let q = Query::decode(m.payload.clone()).unwrap();
            let sent = q.timings.unwrap().stages[0].received_unix_us;
            latency.record((now_unix_us() - sent).max(1) as u64).unwrap();
            m.ack().await.unwrap();
        }
        latency
    });
    let t = Instant::now();
    match rate {
        None => {
            publish_pipelined(&publisher, n).await;
        }
        Some(rate) => {
            let mut pending = Vec::new();
            for i in 0..n {
                let intended = t + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(intended.into()).await;
                pending.push(publisher.send(message(i)).await.unwrap());
            }
            futures::future::try_join_all(pending).await.unwrap();
        }
    }
    let latency = receiving.await.unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    relaying.await.unwrap().unwrap();
    HopResult { rate, latency }
}

fn main() {
    let n: usize = std::env::var("MILLRACE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let settings = BusSettings::default();
        let (_nats, publisher, _) = fresh(&settings).await;
        let awaited = publish_awaiting_each(&publisher, n / 10).await;
        let (_nats2, publisher2, _) = fresh(&settings).await;
        let pipelined = publish_pipelined(&publisher2, n).await;
        let burst = relay_hop(&settings, n, None).await;
        let steady = relay_hop(&settings, 2500, Some(500.0)).await;
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!("\nMillrace bus, {PAYLOAD_BYTES} B messages, file storage, {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        println!("| measurement                                   | msgs/s   | p50 ms | p99 ms |");
        println!("|-----------------------------------------------|----------|--------|--------|");
        println!("| publish, each PubAck awaited ({:>6} msgs)    | {awaited:>8.0} |        |        |", n / 10);
        println!("| publish, PubAcks pipelined ({n:>6} msgs)      | {pipelined:>8.0} |        |        |");
        println!("| relay hop, burst of {n:>6} (max rate)         | {:>8.0} | {:>6.1} | {:>6.1} |", burst.rate, ms(&burst.latency, 0.5), ms(&burst.latency, 0.99));
        println!("| relay hop, open loop at 500/s (2500 msgs)     | {:>8.0} | {:>6.2} | {:>6.2} |", steady.rate, ms(&steady.latency, 0.5), ms(&steady.latency, 0.99));
    });
}

//! Bus benchmark against a real nats-server (file storage): publish throughput with PubAcks
//! awaited one by one vs pipelined, and chains of consume → publish → ack relays: one hop, and
//! the bare 7-hop chain that the whole mesh (7 stage hops) is measured against. Each chain is
//! timed at its max rate (a burst), at a fixed open-loop rate (p50/p99 end to end), and on a
//! ramp of open-loop rates. Prints a table.
//!
//! `cargo bench -p millrace-bus --bench bus`
//! Env: `MILLRACE_BENCH` picks sections (comma-separated; default all): `publish`, `hop`
//! (one relay), `chain` (`MILLRACE_BENCH_HOPS` relays, default 7), `ramp` (the chain at each
//! open-loop rate of `MILLRACE_BENCH_RAMP`, default 1000,2000,4000,8000, for 5 s each).
//! `ledger` (the cost of the durable decisions: a terminal result's publish, decided in
//! `MR_OUTCOMES` first, against a plain publish of the same size, and a keyed submit's
//! accepted-key check + record, each awaited one by one).
//! `sync` (what `jetstream { sync_interval: always }` costs: the `publish` rows against a
//! server with the default fsync interval and one that fsyncs every write, on one server at R1
//! and on a three-node cluster of local processes at R3, `MILLRACE_BENCH_SYNC_TOPOLOGIES`
//! picking among `r1,r3`, default both).
//! `MILLRACE_BENCH_N` scales the burst counts (default 20000).
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::{ConsumerSpec, Edge, EdgeKey};
use millrace_bus::{BusSettings, Dedup, Delivery, Handler, Publisher, StageConsumer, StageError, Topology};
use millrace_proto::v1::{Query, RequestContext, TerminalStatus, Timings};
use millrace_proto::{Message as _, now_unix_us};
use millrace_testkit::{ClusterOptions, NatsCluster, NatsOptions, NatsServer};
use tokio_util::sync::CancellationToken;

const PAYLOAD_BYTES: usize = 300;
/// The open-loop rate of the latency rows, and its message count (5 s).
const STEADY_RATE: f64 = 500.0;
const STEADY_N: usize = 2500;
const RAMP_SECONDS: f64 = 5.0;
/// Messages sent through a fresh chain before timing: the first ones wait for its pulls to start.
const WARMUP: usize = 200;

/// Message `i`, stamped as sent at `sent_unix_us`, for `edge`.
fn message(i: usize, edge: Edge, sent_unix_us: i64) -> Outbound {
    let mut timings = Timings::default();
    timings.stages.push(Default::default());
    timings.stages[0].received_unix_us = sent_unix_us;
    let mut q = Query {
        ctx: Some(RequestContext { request_id: format!("b{i}"), ..Default::default() }),
        timings: Some(timings),
        ..Default::default()
    };
    q.text = "x".repeat(PAYLOAD_BYTES.saturating_sub(q.encoded_len()));
    Outbound {
        subject: edge.subject_for(""),
        msg_id: Dedup::Stage("bench").msg_id(&format!("b{i}")),
        payload: q.encode_to_vec().into(),
    }
}

/// A terminal result of request `b<i>` of the bench's message size.
fn terminal(i: usize) -> Outbound {
    let ctx = RequestContext { request_id: format!("b{i}"), ..Default::default() };
    let mut result = millrace_bus::terminal_result("bench", Some(ctx), None, TerminalStatus::Completed, "", "");
    result.completion = "x".repeat(PAYLOAD_BYTES.saturating_sub(result.encoded_len()));
    Outbound::terminal(&result)
}

/// Runs `op(0..n)` one after another: operations per second and each one's latency (µs; the
/// table shows ms).
async fn timed_each<F, T, E>(n: usize, op: impl Fn(usize) -> F) -> (f64, Histogram<u64>)
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let mut latency = Histogram::<u64>::new(3).unwrap();
    let t = Instant::now();
    for i in 0..n {
        let started = Instant::now();
        op(i).await.unwrap();
        latency.record(started.elapsed().as_micros() as u64).unwrap();
    }
    (n as f64 / t.elapsed().as_secs_f64(), latency)
}

async fn server(settings: &BusSettings) -> (NatsServer, BusSettings) {
    let nats = NatsServer::start().await.expect("nats-server");
    let settings = BusSettings { nats_url: nats.url(), ..settings.clone() };
    (nats, settings)
}

/// What `jetstream { sync_interval: always }` adds to every write: an fsync before the PubAck.
const SYNC_ALWAYS: &str = "jetstream { sync_interval: always }\n";

/// A fresh broker (R1: one server; R3: three nodes), fsyncing every write if `always`, and
/// the settings to reach it with. The broker runs until the box is dropped.
async fn broker(settings: &BusSettings, replicas: usize, always: bool) -> (Box<dyn std::any::Any>, BusSettings) {
    let config = always.then(|| SYNC_ALWAYS.to_owned());
    let (broker, url) = if replicas == 1 {
        let nats = NatsServer::start_with(NatsOptions { config, ..Default::default() }).await.expect("nats-server");
        let url = nats.url();
        (Box::new(nats) as Box<dyn std::any::Any>, url)
    } else {
        let cluster =
            NatsCluster::start_with(replicas, ClusterOptions { config, ..Default::default() }).await.expect("cluster");
        let url = cluster.urls();
        (Box::new(cluster) as Box<dyn std::any::Any>, url)
    };
    (broker, BusSettings { nats_url: url, stream_replicas: replicas, ..settings.clone() })
}

/// A connection of its own, as each service of the mesh has (with its own publish window).
async fn connection(settings: &BusSettings, name: &str) -> Publisher {
    let client = millrace_bus::connect(&settings.nats_url, name, Duration::from_secs(5)).await.unwrap();
    Publisher::new(client, settings).await.unwrap()
}

/// Publishes messages `ids` in chunks of 1024 PubAcks awaited together; returns msgs/s.
async fn publish_pipelined(publisher: &Publisher, edge: Edge, ids: Range<usize>) -> f64 {
    let (n, t) = (ids.len(), Instant::now());
    for chunk in ids.collect::<Vec<_>>().chunks(1024) {
        publisher
            .publish_all(chunk.iter().map(|&i| message(i, edge, now_unix_us())).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// One hop of a chain: consumes its edge and publishes each message on to the next edge
/// (deduplicated by `<request_id>/<stage>`), acked after the PubAck.
struct Relay {
    publisher: Publisher,
    to: Edge,
    stage: &'static str,
}

impl Handler for Relay {
    async fn handle(&self, d: &Delivery) -> Result<(), StageError> {
        let id = d.request_id().unwrap_or_default();
        self.publisher
            .publish(Outbound {
                subject: self.to.subject_for(""),
                msg_id: Dedup::Stage(self.stage).msg_id(&id),
                payload: d.payload.clone(),
            })
            .await?;
        Ok(())
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Edge `i` of a bench chain: a stream of its own, configured as the mesh's edges are.
fn chain_edge(i: usize) -> Edge {
    Edge { stream: leak(format!("BENCH_HOP{i}")), subject: leak(format!("bench.hop{i}")), key: EdgeKey::None }
}

struct ChainResult {
    /// Messages per second end to end: `n` over first publish → last arrival.
    rate: f64,
    /// Publish → arrival at the last edge.
    latency: Histogram<u64>,
}

/// Streams 0..=hops with a relay between each consecutive pair (each on its own connection) and
/// a reader of the last; after a warm-up, sends `n` messages into stream 0 at `rate`/s (open
/// loop, each stamped with its intended send time; None = all at once, pipelined) and times
/// each to the last edge.
async fn relay_chain(settings: &BusSettings, hops: usize, n: usize, rate: Option<f64>) -> ChainResult {
    let (_nats, settings) = server(settings).await;
    let edges: Vec<Edge> = (0..=hops).map(chain_edge).collect();
    let readers: Vec<ConsumerSpec> =
        edges.iter().enumerate().map(|(i, &edge)| ConsumerSpec { edge, durable: leak(format!("hop{i}")) }).collect();
    let source = connection(&settings, "bench-source").await;
    Topology::new(&settings, &edges, &readers).provision(source.jetstream()).await.unwrap();

    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for i in 0..hops {
        let publisher = connection(&settings, readers[i].durable).await;
        let relay = Relay { publisher: publisher.clone(), to: edges[i + 1], stage: readers[i].durable };
        let consumer = StageConsumer::new(readers[i], Arc::new(relay), publisher, settings.clone());
        let stop = stop.clone();
        relays.push(tokio::spawn(async move { consumer.run(stop, || ()).await }));
    }

    let sink = connection(&settings, "bench-sink").await;
    let last: async_nats::jetstream::consumer::PullConsumer = sink
        .jetstream()
        .get_stream(edges[hops].stream)
        .await
        .unwrap()
        .get_consumer(readers[hops].durable)
        .await
        .unwrap();
    let mut arrivals = last.stream().max_messages_per_batch(512).messages().await.unwrap();
    // Warm-up messages take the ids after the measured ones.
    publish_pipelined(&source, edges[0], n..n + WARMUP).await;
    for _ in 0..WARMUP {
        arrivals.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    let receiving = tokio::spawn(async move {
        let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for _ in 0..n {
            let m = arrivals.next().await.unwrap().unwrap();
            let q = Query::decode(m.payload.clone()).unwrap();
            let sent = q.timings.unwrap().stages[0].received_unix_us;
            latency.saturating_record((now_unix_us() - sent).max(1) as u64);
            m.ack().await.unwrap();
        }
        latency
    });

    let t = Instant::now();
    match rate {
        None => {
            publish_pipelined(&source, edges[0], 0..n).await;
        }
        Some(rate) => {
            let start_unix_us = now_unix_us();
            let mut pending = Vec::new();
            for i in 0..n {
                let offset = Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until((t + offset).into()).await;
                pending
                    .push(source.send(message(i, edges[0], start_unix_us + offset.as_micros() as i64)).await.unwrap());
            }
            futures::future::try_join_all(pending).await.unwrap();
        }
    }
    let latency = receiving.await.unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    for relay in relays {
        relay.await.unwrap().unwrap();
    }
    ChainResult { rate, latency }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() {
    let n: usize = env("MILLRACE_BENCH_N", "20000").parse().expect("MILLRACE_BENCH_N");
    let hops: usize = env("MILLRACE_BENCH_HOPS", "7").parse().expect("MILLRACE_BENCH_HOPS");
    let sections = env("MILLRACE_BENCH", "publish,ledger,sync,hop,chain,ramp");
    let ramp: Vec<f64> = env("MILLRACE_BENCH_RAMP", "1000,2000,4000,8000")
        .split(',')
        .map(|r| r.trim().parse().expect("MILLRACE_BENCH_RAMP"))
        .collect();
    let runs = |section: &str| sections.split(',').any(|s| s.trim() == section);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut rows = Vec::new();
    let mut row = |what: String, rate: f64, latency: Option<&Histogram<u64>>| {
        let (p50, p99) = latency
            .map_or((String::new(), String::new()), |h| (format!("{:.2}", ms(h, 0.5)), format!("{:.2}", ms(h, 0.99))));
        let line = format!("| {what:<52} | {rate:>8.0} | {p50:>7} | {p99:>7} |");
        eprintln!("{line}");
        rows.push(line);
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let settings = BusSettings::default();
        if runs("publish") {
            let (_nats, settings) = server(&settings).await;
            let publisher = millrace_bus::connect_mesh(&settings, "bench").await.unwrap();
            let count = n / 10;
            let each = timed_each(count, |i| publisher.publish(message(i, Edge::QUERIES, now_unix_us()))).await;
            row(format!("publish, each PubAck awaited ({count} msgs)"), each.0, Some(&each.1));
            let (_nats, settings) = server(&settings).await;
            let publisher = millrace_bus::connect_mesh(&settings, "bench").await.unwrap();
            row(
                format!("publish, PubAcks pipelined ({n} msgs)"),
                publish_pipelined(&publisher, Edge::QUERIES, 0..n).await,
                None,
            );
        }
        if runs("ledger") {
            let (_nats, settings) = server(&settings).await;
            let publisher = millrace_bus::connect_mesh(&settings, "bench").await.unwrap();
            let count = n / 10;
            let terminal = timed_each(count, |i| publisher.publish(terminal(i))).await;
            row(format!("terminal result: decide + publish ({count})"), terminal.0, Some(&terminal.1));
            let ledger = publisher.ledger();
            let keyed = timed_each(count, |i| async move {
                let id = format!("k{i}");
                ledger.was_accepted(&id).await?;
                ledger.record_accepted(&id).await
            })
            .await;
            row(format!("keyed submit: accepted check + record ({count})"), keyed.0, Some(&keyed.1));
        }
        if runs("sync") {
            let topologies = env("MILLRACE_BENCH_SYNC_TOPOLOGIES", "r1,r3");
            for replicas in [1, 3].into_iter().filter(|r| topologies.split(',').any(|t| t.trim() == format!("r{r}"))) {
                for always in [false, true] {
                    let sync = if always { "sync always" } else { "sync 2 min" };
                    let count = n / 10;
                    // A fresh broker for each row, stopped before the next starts.
                    let each = {
                        let (_broker, on) = broker(&settings, replicas, always).await;
                        let publisher = millrace_bus::connect_mesh(&on, "bench").await.unwrap();
                        timed_each(count, |i| publisher.publish(message(i, Edge::QUERIES, now_unix_us()))).await
                    };
                    row(format!("R{replicas}, {sync}: publish, each PubAck awaited ({count})"), each.0, Some(&each.1));
                    let pipelined = {
                        let (_broker, on) = broker(&settings, replicas, always).await;
                        let publisher = millrace_bus::connect_mesh(&on, "bench").await.unwrap();
                        publish_pipelined(&publisher, Edge::QUERIES, 0..n).await
                    };
                    row(format!("R{replicas}, {sync}: publish, PubAcks pipelined ({n})"), pipelined, None);
                }
            }
        }
        let chains = [("hop", 1), ("chain", hops)].into_iter().filter(|&(section, _)| runs(section));
        for (_, hops) in chains {
            let name = if hops == 1 { "relay hop".to_owned() } else { format!("{hops}-hop relay chain") };
            let burst = relay_chain(&settings, hops, n, None).await;
            row(format!("{name}, burst of {n} (max rate)"), burst.rate, Some(&burst.latency));
            let steady = relay_chain(&settings, hops, STEADY_N, Some(STEADY_RATE)).await;
            row(format!("{name}, open loop at {STEADY_RATE}/s ({STEADY_N} msgs)"), steady.rate, Some(&steady.latency));
        }
        if runs("ramp") {
            for &rate in &ramp {
                let r = relay_chain(&settings, hops, (rate * RAMP_SECONDS) as usize, Some(rate)).await;
                row(
                    format!("{hops}-hop relay chain, open loop at {rate}/s ({RAMP_SECONDS} s)"),
                    r.rate,
                    Some(&r.latency),
                );
            }
        }
    });
    println!(
        "\nMillrace bus, {PAYLOAD_BYTES} B messages, file storage, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("| {:<52} | msgs/s   | p50 ms  | p99 ms  |", "measurement");
    println!("|{}|----------|---------|---------|", "-".repeat(54));
    for line in rows {
        println!("{line}");
    }
}

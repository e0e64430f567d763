//! Preprocess benchmark. Prints a table:
//! - the stage logic on one core, without NATS: normalization, redaction and token counting
//!   alone, then the whole per-text path, over a mix of ~300-character texts (half with PII,
//!   a quarter non-ASCII);
//! - through NATS: N Queries published to QUERIES (pipelined), the stage running in-process
//!   (`StageConsumer` + `PreprocessStage`, as the binary wires it) with 1 and 16 workers, timed
//!   until N CleanedQueries have arrived on CLEAN (consumed and acked as moderation would), with
//!   the publish → arrival latency of each (a burst: the latency is mostly queueing), and the
//!   longest pause between two messages reaching the stage (a stalled pull shows there).
//!
//! `cargo bench -p millrace-preprocess` (MILLRACE_BENCH_N scales the message counts; needs
//! `models/prepared` and nats-server, as the tests do).
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use hdrhistogram::Histogram;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::{ConsumerSpec, Edge};
use millrace_bus::{BusSettings, Dedup, StageConsumer};
use millrace_preprocess::budget::TokenModels;
use millrace_preprocess::clean::{Overflow, Policy, Preprocessor};
use millrace_preprocess::normalize::normalize;
use millrace_preprocess::pii::{Detectors, Redactor};
use millrace_preprocess::stage::PreprocessStage;
use millrace_proto::v1::{CleanedQuery, Query, RequestContext, Timings};
use millrace_proto::{Message as _, now_unix_us};
use millrace_testkit::{NatsServer, workspace_root};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "smollm2-135m";

const WORDS: &[&str] = &[
    "the",
    "order",
    "arrived",
    "yesterday",
    "but",
    "the",
    "invoice",
    "is",
    "missing",
    "please",
    "check",
    "my",
    "account",
    "and",
    "tell",
    "me",
    "when",
    "refund",
    "will",
    "be",
    "processed",
    "thanks",
    "for",
    "your",
    "help",
    "with",
    "this",
    "issue",
    "version",
    "2.4.1",
    "of",
    "app",
    "crashes",
    "on",
    "startup",
    "since",
    "update",
];
const PII: &[&str] = &[
    "ann.smith@example.com",
    "+44 20 7946 0958",
    "(555) 123-4567",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "123-45-6789",
    "192.168.1.10",
    "2001:db8::8a2e:370:7334",
];
const UNICODE: &[&str] = &["Ｆｕｌｌ-ｗｉｄｔｈ", "ﬁnal", "café\u{200B}", "naïve résumé", "日本語のテキスト", "🦀"];

/// A deterministic mix of ~300-character texts: even ones carry PII, every fourth Unicode.
fn corpus(n: usize) -> Vec<String> {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as usize
    };
    (0..n)
        .map(|i| {
            let mut text = String::with_capacity(320);
            while text.len() < 300 {
                let r = next();
                if i % 2 == 0 && r % 9 == 0 {
                    text.push_str(PII[r / 9 % PII.len()]);
                } else if i % 4 == 1 && r % 7 == 0 {
                    text.push_str(UNICODE[r / 7 % UNICODE.len()]);
                } else {
                    text.push_str(WORDS[r / 3 % WORDS.len()]);
                }
                text.push_str(if r % 11 == 0 { ".  " } else { " " });
            }
            text
        })
        .collect()
}

fn rate(n: usize, f: impl FnMut(&str), texts: &[String]) -> f64 {
    let mut f = f;
    for t in texts.iter().take(200) {
        f(t); // warm up
    }
    let started = Instant::now();
    for t in texts.iter().cycle().take(n) {
        f(t);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn preprocessor() -> Preprocessor {
    let models = TokenModels::load(&workspace_root().join("models/prepared")).expect("models/prepared");
    let policy = Policy { max_chars: 8000, reserve_tokens: 512, overflow: Overflow::Reject, detectors: Detectors::ALL };
    Preprocessor::new(policy, models)
}

fn query(i: usize, text: &str) -> Outbound {
    let id = format!("bench-{i}");
    let mut timings = Timings::default();
    timings.record("ingest", now_unix_us());
    let q = Query {
        ctx: Some(RequestContext { request_id: id.clone(), model: MODEL.into(), ..Default::default() }),
        timings: Some(timings),
        text: text.to_owned(),
        ..Default::default()
    };
    Outbound {
        subject: Edge::QUERIES.subject_for(""),
        msg_id: Dedup::Stage("ingest").msg_id(&id),
        payload: q.encode_to_vec().into(),
    }
}

struct Hop {
    rate: f64,
    latency: Histogram<u64>,
    longest_pause_ms: f64,
}

/// N queries through QUERIES → preprocess (in-process, `workers`) → CLEAN.
async fn through_nats(texts: &[String], n: usize, workers: usize, preprocessor: Arc<Preprocessor>) -> Hop {
    let nats = NatsServer::start().await.expect("nats-server");
    let settings = BusSettings { nats_url: nats.url(), workers, ..Default::default() };
    let publisher = millrace_bus::connect_mesh(&settings, "bench").await.unwrap();
    let stage = PreprocessStage { preprocessor, publisher: publisher.clone() };
    let consumer = StageConsumer::new(ConsumerSpec::PREPROCESS, Arc::new(stage), publisher.clone(), settings);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop, || ()).await }
    });
    let downstream: async_nats::jetstream::consumer::PullConsumer = publisher
        .jetstream()
        .get_stream(Edge::CLEAN.stream)
        .await
        .unwrap()
        .get_consumer(ConsumerSpec::MODERATION_INPUT.durable)
        .await
        .unwrap();
    let mut arrivals = downstream.stream().max_messages_per_batch(512).messages().await.unwrap();
    let receiving = tokio::spawn(async move {
        let mut latency = Histogram::<u64>::new(3).unwrap();
        let (mut prev, mut longest_pause) = (0i64, 0i64);
        for _ in 0..n {
            let m = arrivals.next().await.unwrap().unwrap();
            let q = CleanedQuery::decode(m.payload.clone()).unwrap();
            let t = q.timings.unwrap();
            let sent = t.stages[0].received_unix_us;
            // The longest pause between two messages reaching the stage: a stalled pull shows here.
            let received = t.stages[1].received_unix_us;
            if prev > 0 {
                longest_pause = longest_pause.max(received - prev);
            }
            prev = received;
            latency.record((now_unix_us() - sent).max(1) as u64).unwrap();
            m.ack().await.unwrap();
        }
        (latency, longest_pause)
    });
    let started = Instant::now();
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(512) {
        publisher.publish_all(chunk.iter().map(|&i| query(i, &texts[i % texts.len()]))).await.unwrap();
    }
    let (latency, longest_pause) = receiving.await.unwrap();
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    running.await.unwrap().unwrap();
    drop(nats);
    Hop { rate, latency, longest_pause_ms: longest_pause as f64 / 1000.0 }
}

fn main() {
    let n: usize = std::env::var("MILLRACE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let texts = corpus(1000);
    let mean_chars = texts.iter().map(|t| t.chars().count()).sum::<usize>() / texts.len();
    let preprocessor = Arc::new(preprocessor());
    let redactor = Redactor::new(Detectors::ALL);
    let tokenizer = preprocessor.models().get(MODEL).unwrap();
    let normalized: Vec<String> = texts.iter().map(|t| normalize(t)).collect();

    let normalize_rate = rate(n, |t| drop(std::hint::black_box(normalize(t))), &texts);
    let redact_rate = rate(n, |t| drop(std::hint::black_box(redactor.redact(t))), &normalized);
    let count_rate = rate(
        n,
        |t| {
            std::hint::black_box(tokenizer.count(t).unwrap());
        },
        &normalized,
    );
    let full_rate = rate(n, |t| drop(std::hint::black_box(preprocessor.process(MODEL, t).unwrap())), &texts);
    let with_pii: Vec<String> = texts.iter().step_by(2).cloned().collect();
    let without_pii: Vec<String> = texts.iter().skip(1).step_by(2).cloned().collect();
    let full_pii = rate(n, |t| drop(preprocessor.process(MODEL, t).unwrap()), &with_pii);
    let full_clean = rate(n, |t| drop(preprocessor.process(MODEL, t).unwrap()), &without_pii);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (one, sixteen) = runtime.block_on(async {
        // One worker is slow per message (a round trip each): a tenth of the messages.
        let one = through_nats(&texts, n / 10, 1, preprocessor.clone()).await;
        let sixteen = through_nats(&texts, n, 16, preprocessor.clone()).await;
        (one, sixteen)
    });

    let us = |rate: f64| 1e6 / rate;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "\nMillrace preprocess, {} texts of ~{mean_chars} chars (half with PII), model {MODEL}, {n} messages per row unless said, {} cores",
        texts.len(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "| measurement                                        | msgs/s   | µs/msg | p50 ms | p99 ms | longest pause ms |"
    );
    println!(
        "|----------------------------------------------------|----------|--------|--------|--------|------------------|"
    );
    for (name, r) in [
        ("normalize only (1 core)", normalize_rate),
        ("redact only, 7 detectors (1 core)", redact_rate),
        ("token count only (1 core)", count_rate),
        ("whole stage logic, mix (1 core)", full_rate),
        ("whole stage logic, texts with PII (1 core)", full_pii),
        ("whole stage logic, texts without PII (1 core)", full_clean),
    ] {
        println!("| {name:<50} | {r:>8.0} | {:>6.1} |        |        |                  |", us(r));
    }
    for (name, hop) in [
        (format!("through NATS, workers=1, burst of {}", n / 10), &one),
        (format!("through NATS, workers=16, burst of {n}"), &sixteen),
    ] {
        println!(
            "| {name:<50} | {:>8.0} | {:>6.1} | {:>6.1} | {:>6.1} | {:>16.1} |",
            hop.rate,
            us(hop.rate),
            ms(&hop.latency, 0.5),
            ms(&hop.latency, 0.99),
            hop.longest_pause_ms
        );
    }
}

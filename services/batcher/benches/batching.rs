//! Batching benchmark against the real inference service with SmolLM2: open-loop arrivals at a
//! low, a medium and a saturating rate, for (a) no batching, (b) fixed batches of 8 and (c) the
//! dynamic batcher. Latency is from each request's intended send time to its completion
//! (no coordinated omission). Prints a table.
//!
//! `cargo build --release --bins && cargo bench -p millrace-batcher --bench batching`
//! Env: MILLRACE_BENCH_RATES (default "0.5,2,10" requests/s), MILLRACE_BENCH_SECONDS (15),
//! MILLRACE_BENCH_NEW_TOKENS (16).
use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::Edge;
use millrace_bus::{BusSettings, Dedup, Publisher};
use millrace_engine::{ChatMessage, Manifest};
use millrace_proto::Message as _;
use millrace_proto::v1::{Completion, GenerationParams, Prompt, RequestContext};
use millrace_testkit::{NatsServer, ServiceProcess, workspace_root};

const MODEL: &str = "smollm2-135m";
const QUESTIONS: [&str; 6] = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "What do bees make?",
    "Give me one word for happy.",
    "What is two plus two?",
    "Which animal barks?",
];

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Mode {
    name: &'static str,
    args: &'static [&'static str],
}

const MODES: [Mode; 3] = [
    Mode { name: "(a) no batching", args: &["--max-batch-size=1", "--max-in-flight=1"] },
    Mode {
        name: "(b) fixed batches of 8",
        args: &["--max-batch-size=8", "--max-wait-ms=20000", "--dispatch-when-idle=false", "--max-in-flight=1"],
    },
    Mode { name: "(c) dynamic", args: &[] },
];

struct Run {
    latency: Histogram<u64>,
    completions_per_s: f64,
}

async fn run(publisher: &Publisher, prompts: &[String], rate: f64, seconds: f64, new_tokens: u32, round: &str) -> Run {
    let n = ((rate * seconds).round() as usize).max(3);
    let js = publisher.jetstream().clone();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        js.get_stream("MR_COMPLETIONS").await.unwrap().get_consumer("moderation-output").await.unwrap();
    let mut arrivals = consumer.messages().await.unwrap();
    let start = Instant::now();
    let intended: HashMap<String, Instant> =
        (0..n).map(|i| (format!("{round}-{i}"), start + Duration::from_secs_f64(i as f64 / rate))).collect();
    let sender = {
        let publisher = publisher.clone();
        let prompts = prompts.to_vec();
        let round = round.to_owned();
        tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
                let rid = format!("{round}-{i}");
                let prompt = Prompt {
                    ctx: Some(RequestContext {
                        request_id: rid.clone(),
                        model: MODEL.into(),
                        params: Some(GenerationParams { max_new_tokens: new_tokens, ..Default::default() }),
                        ..Default::default()
                    }),
                    prompt: prompts[i % prompts.len()].clone(),
                    prompt_tokens: 40,
                    ..Default::default()
                };
                let out = Outbound {
                    subject: Edge::PROMPTS.subject_for(MODEL),
                    msg_id: Dedup::Stage("session").msg_id(&rid),
                    payload: prompt.encode_to_vec().into(),
                };
                publisher.publish(out).await.unwrap();
            }
        })
    };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000, 3).unwrap();
    let mut last = start;
    while (latency.len() as usize) < n {
        let m = tokio::time::timeout(Duration::from_secs(300), arrivals.next())
            .await
            .expect("completions stalled")
            .unwrap()
            .unwrap();
        let completion = Completion::decode(m.payload.clone()).unwrap();
        m.ack().await.unwrap();
        let rid = completion.ctx.unwrap_or_default().request_id;
        if let Some(at) = intended.get(&rid) {
            last = Instant::now();
            latency.record(last.duration_since(*at).as_millis().max(1) as u64).unwrap();
        }
    }
    sender.await.unwrap();
    Run { latency, completions_per_s: n as f64 / last.duration_since(start).as_secs_f64() }
}

fn main() {
    let rates: Vec<f64> = std::env::var("MILLRACE_BENCH_RATES")
        .unwrap_or_else(|_| "0.5,2,10".into())
        .split(',')
        .map(|r| r.trim().parse().expect("rate"))
        .collect();
    let seconds: f64 = env("MILLRACE_BENCH_SECONDS", 15.0);
    let new_tokens: u32 = env("MILLRACE_BENCH_NEW_TOKENS", 16);
    let models = workspace_root().join("models/prepared");
    let template = Manifest::load(&models).expect("prepared models").chat_template(MODEL).expect("template");
    let prompts: Vec<String> =
        QUESTIONS.iter().map(|q| template.render(&[ChatMessage::new("user", q)], true).expect("render")).collect();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let nats = NatsServer::start().await.expect("nats-server");
        let settings = BusSettings { nats_url: nats.url(), ..Default::default() };
        let publisher = millrace_bus::connect_mesh(&settings, "bench").await.unwrap();
        let args = [format!("--nats-url={}", nats.url()), format!("--models-dir={}", models.display())];
        let _inference = ServiceProcess::start("inference", &args, &["--grpc-addr"], Duration::from_secs(60))
            .await
            .expect("inference binary (cargo build --release --bins)");

        let mut table = Vec::new();
        for (m, mode) in MODES.iter().enumerate() {
            let mut args = vec![format!("--nats-url={}", nats.url())];
            args.extend(mode.args.iter().map(|a| a.to_string()));
            let mut batcher =
                ServiceProcess::start("batcher", &args, &[], Duration::from_secs(30)).await.expect("batcher binary");
            for (r, &rate) in rates.iter().enumerate() {
                let result = run(&publisher, &prompts, rate, seconds, new_tokens, &format!("m{m}r{r}")).await;
                eprintln!("{} at {rate}/s: p50 {} ms", mode.name, result.latency.value_at_quantile(0.5));
                table.push((mode.name, rate, result));
            }
            batcher.terminate(Duration::from_secs(30)).await.unwrap();
        }
        println!("\nBatching with SmolLM2 ({new_tokens} new tokens), open-loop arrivals, {seconds} s per rate, this machine's CPU");
        println!("| mode | offered req/s | p50 ms | p99 ms | completions/s |");
        println!("|---|---:|---:|---:|---:|");
        for (mode, rate, r) in &table {
            println!(
                "| {mode} | {rate} | {} | {} | {:.2} |",
                r.latency.value_at_quantile(0.5),
                r.latency.value_at_quantile(0.99),
                r.completions_per_s
            );
        }
    });
}

//! Moderation bench: messages per second for a mix of ~200-character texts (two or three
//! sentences each; about half hold an abusive or profane sentence, some obfuscated, and many
//! hold words a substring filter would catch), on one thread without NATS — normalization + rules,
//! the classifier, both — and through NATS with the release `moderation` binary
//! (CLEAN → ADMITTED/RESULTS). Prints a table.
//!
//! `cargo bench -p millrace-moderation --bench moderation`
//! Env: `MILLRACE_MODELS_DIR` (default models/prepared), `MILLRACE_BENCH_MESSAGES` (NATS part,
//! default 5000), `MILLRACE_BENCH_SECONDS` (per in-process row, default 2).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::Edge;
use millrace_bus::{BusSettings, Dedup};
use millrace_moderation::moderator::{ClassifierPool, Moderator, PolicyStore};
use millrace_moderation::normalize::normalize;
use millrace_moderation::policy::{Policy, Stage};
use millrace_proto::Message as _;
use millrace_proto::v1::{AdmittedQuery, CleanedQuery, RequestContext};
use millrace_testkit::{NatsServer, ServiceProcess};

const SENTENCES: [&str; 18] = [
    "Could you explain how the borrow checker decides when a reference may outlive its owner?",
    "I am planning a trip to Lisbon in May and would love some tips on neighbourhoods to stay in.",
    "The quarterly report shows revenue up four percent, mostly from the new subscription plan.",
    "Write a short poem about a mill race in the early morning, with mist over the water.",
    "My sourdough starter smells a little like acetone; is it still safe to bake with it?",
    "Summarize the main arguments for and against remote work in two or three sentences.",
    "What is the difference between a process and a thread, and when should I use each one?",
    "The assassin bug in the cocktail bar in Scunthorpe was, frankly, a hell of a surprise.",
    "Please translate 'good morning, how did you sleep?' into Portuguese and Spanish.",
    "this damn build keeps failing and I have no idea why, the logs are useless",
    "Our team killed it at the hackathon and the judges want to shoot us an email tomorrow.",
    "List three ways to reduce memory usage in a Python script that reads large CSV files.",
    "f u c k you and your stupid questions, you worthless piece of sh1t",
    "I will find you and I'll k1ll you, you @sshole",
    "Recommend a few science fiction novels for someone who loved The Left Hand of Darkness.",
    "How many grams of flour are in a cup, and does it matter if the flour is sifted first?",
    "Thanks so much, that answer was exactly what I needed for my therapist appointment notes.",
    "What a load of bullshit, honestly, wtf were they thinking with this release",
];

/// `n` texts of about 200 characters: two or three sentences each, in rotation.
fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut t = String::new();
            let mut k = i * 7;
            while t.len() < 180 {
                if !t.is_empty() {
                    t.push(' ');
                }
                t.push_str(SENTENCES[k % SENTENCES.len()]);
                k += 5;
            }
            t
        })
        .collect()
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Runs `f` over the texts for about `seconds`; messages per second and µs per message.
fn rate(texts: &[String], seconds: f64, mut f: impl FnMut(&str)) -> (f64, f64) {
    for t in texts.iter().take(32) {
        f(t); // warm-up
    }
    let started = Instant::now();
    let mut done = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        for t in texts {
            f(t);
        }
        done += texts.len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    (done as f64 / elapsed, elapsed * 1e6 / done as f64)
}

fn main() {
    let dir = PathBuf::from(env("MILLRACE_MODELS_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/prepared")));
    let seconds: f64 = env("MILLRACE_BENCH_SECONDS", "2").parse().expect("MILLRACE_BENCH_SECONDS");
    let messages: usize = env("MILLRACE_BENCH_MESSAGES", "5000").parse().expect("MILLRACE_BENCH_MESSAGES");
    let texts = texts(256);
    let mean_len = texts.iter().map(String::len).sum::<usize>() / texts.len();
    let policy = Policy::default_policy();
    let classifier = Arc::new(ClassifierPool::load(&dir, "profanity", 1, 1).expect("classifier"));
    let moderator = Moderator::new(Arc::new(PolicyStore::fixed(Policy::default_policy())), Some(classifier.clone()));
    let blocked_or_flagged =
        texts.iter().filter(|t| moderator.check_blocking(t, Stage::Input).unwrap().action.as_str() != "allow").count();

    println!(
        "\nMillrace moderation: default policy, {} texts of ~{mean_len} chars ({blocked_or_flagged} flagged or blocked)",
        texts.len()
    );
    println!("| path | messages/s | µs/message |");
    println!("|------|-----------:|-----------:|");
    let row = |name: &str, (per_s, us): (f64, f64)| println!("| {name} | {per_s:>10.0} | {us:>10.1} |");
    row("normalize only (1 thread)", rate(&texts, seconds, |t| drop(normalize(t))));
    row(
        "normalize + rules (1 thread)",
        rate(&texts, seconds, |t| drop(policy.evaluate(&normalize(t), Stage::Input, None))),
    );
    row(
        "classifier only (1 thread, 1 intra-op thread)",
        rate(&texts, seconds, |t| drop(classifier.scores(&[t]).unwrap())),
    );
    row(
        "rules + classifier = one check (1 thread)",
        rate(&texts, seconds, |t| drop(moderator.check_blocking(t, Stage::Input).unwrap())),
    );
    let batch: Vec<&str> = texts.iter().take(32).map(String::as_str).collect();
    let (per_s, _) = rate(&texts[..1], seconds, |_| drop(classifier.scores(&batch).unwrap()));
    row("classifier, batches of 32 (1 thread)", (per_s * 32.0, 1e6 / (per_s * 32.0)));

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(through_nats(&dir, &texts, messages));
}

async fn through_nats(models: &std::path::Path, texts: &[String], messages: usize) {
    let nats = NatsServer::start().await.expect("nats-server");
    let args = vec![
        format!("--nats-url={}", nats.url()),
        format!("--models-dir={}", models.display()),
        "--classifier-sessions=1".to_owned(),
        "--intra-threads=1".to_owned(),
        "--log=warn".to_owned(),
    ];
    let _service = ServiceProcess::start("moderation", &args, &["--grpc-addr"], Duration::from_secs(60))
        .await
        .expect("moderation binary (cargo bench builds it), ready");
    let settings = BusSettings { nats_url: nats.url(), ..Default::default() };
    let publisher = millrace_bus::connect_mesh(&settings, "bench").await.unwrap();

    let outs: Vec<Outbound> = (0..messages)
        .map(|i| {
            let id = format!("bench-{i}");
            let query = CleanedQuery {
                ctx: Some(RequestContext { request_id: id.clone(), ..Default::default() }),
                text: texts[i % texts.len()].clone(),
                ..Default::default()
            };
            Outbound {
                subject: Edge::CLEAN.subject_for(&id),
                msg_id: Dedup::Stage("bench").msg_id(&id),
                payload: query.encode_to_vec().into(),
            }
        })
        .collect();
    let started = Instant::now();
    for chunk in outs.chunks(256) {
        publisher.publish_all(chunk.to_vec()).await.unwrap();
    }
    let js = publisher.jetstream();
    let count =
        |edge: Edge| async move { js.get_stream(edge.stream).await.unwrap().info().await.unwrap().state.messages };
    loop {
        let done = count(Edge::ADMITTED).await + count(Edge::RESULTS).await;
        if done as usize >= messages {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "only {done} of {messages} after 300 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The stage's own time per message, from the timing records it appends.
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    let mut stream = js.get_stream(Edge::ADMITTED.stream).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    for seq in state.first_sequence..=state.last_sequence.min(state.first_sequence + 2000) {
        let m = stream.get_raw_message(seq).await.unwrap();
        let q = AdmittedQuery::decode(m.payload).unwrap();
        let t = q.timings.unwrap().stages.pop().unwrap();
        histogram.record((t.finished_unix_us - t.received_unix_us).max(0) as u64).unwrap();
    }
    println!(
        "| through NATS: {messages} CleanedQuery → ADMITTED/RESULTS, release binary, 1 classifier session, 64 workers | {:>10.0} | {:>10.1} |",
        messages as f64 / elapsed,
        elapsed * 1e6 / messages as f64
    );
    println!(
        "\nthrough NATS, time inside the stage (received → outcome built, from its timing record): p50 {} µs, p99 {} µs, max {} µs",
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.max()
    );
    println!(
        "(this machine: {} CPUs, shared by nats-server, the service and the bench)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
}

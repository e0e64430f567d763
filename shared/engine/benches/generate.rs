//! Engine bench, like for like: every request generates exactly its `max_new_tokens` (EOS
//! ignored), so two runs, two policies or two engines compare the same work. Sections
//! (`MILLRACE_BENCH_SECTIONS`, default `static,serve,prefix`):
//!
//! - **static**: greedy static batches of chat prompts at several batch sizes (`Generator::
//!   generate`, batched prefill), `MILLRACE_BENCH_REPETITIONS` runs each (default 3), median and
//!   range of generated tokens/s. Also writes the workload (token ids, model file, threads) to
//!   `target/bench/engine-workload.json` for `scripts/py/ort-generate-bench.py`, which runs the
//!   same batches with Python onnxruntime.
//! - **serve**: one seeded open-loop Poisson schedule of requests with mixed prompt lengths
//!   (20–400 tokens) and mixed `max_new_tokens` (8–128), served by the iteration-level scheduler
//!   under the static and the continuous policy in turn, at each rate of
//!   `MILLRACE_BENCH_RATES` (req/s, default `0.2,2`: on 2 CPU cores, below and far above what
//!   static batching sustains): generated tokens/s, TTFT and end-to-end latency from each
//!   request's arrival.
//! - **prefix**: turn 3 of a ~400-token conversation: time to first token with the prefix cache
//!   (turns 1 and 2 ran before) vs without; and how much of N requests sharing a system prompt
//!   was prefilled.
//!
//! `cargo bench -p millrace-engine --bench generate`
//! Env: `MILLRACE_MODELS_DIR` (default models/prepared), `MILLRACE_MODEL` (smollm2-135m),
//! `MILLRACE_PROVIDER` (cpu, cuda, auto), `MILLRACE_INTRA_THREADS` (0 = ONNX Runtime's choice),
//! `MILLRACE_BENCH_BATCHES` (`1,8,16,32`), `MILLRACE_BENCH_NEW_TOKENS` (32, static section),
//! `MILLRACE_BENCH_REQUESTS` (24, per serve run), `MILLRACE_BENCH_JSON` (write every figure there).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use millrace_engine::{
    BatchingPolicy, ChatMessage, ChatTemplate, Event, GenerationRequest, Generator, Manifest, RuntimeOptions,
    Scheduler, SchedulerConfig,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Give me a short tip for writing clear code.",
    "What do mills use water for?",
];
const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
/// Filler for prompts of a chosen length: plain prose the tokenizer splits predictably.
const PROSE: &str = "The mill stands by the river, and its wheel turns with the water that runs past the old \
                     stone walls of the village. ";

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    env(name, default).split(',').map(|x| x.trim().parse().ok().unwrap_or_else(|| panic!("{name}: {x:?}"))).collect()
}

struct Bench {
    model: String,
    provider: String,
    threads: usize,
    manifest: Manifest,
    template: ChatTemplate,
    generator: Option<Generator>,
}

impl Bench {
    fn generator(&mut self) -> Generator {
        self.generator.take().expect("the generator is back")
    }

    fn chat(&self, system: &str, turns: &[(&str, &str)]) -> String {
        let mut messages = vec![ChatMessage::new("system", system)];
        messages.extend(turns.iter().map(|(role, text)| ChatMessage::new(role, text)));
        self.template.render(&messages, true).expect("render")
    }
}

fn fixed(prompt: String, new_tokens: usize) -> GenerationRequest {
    GenerationRequest { ignore_eos: true, ..GenerationRequest::new(prompt, new_tokens) }
}

fn median_and_range(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 - 1.0) * p).round() as usize]
}

fn static_section(bench: &mut Bench) -> Value {
    let batches: Vec<usize> = list("MILLRACE_BENCH_BATCHES", "1,8,16,32");
    let new_tokens: usize = env("MILLRACE_BENCH_NEW_TOKENS", "32").parse().expect("MILLRACE_BENCH_NEW_TOKENS");
    let repetitions: usize = env("MILLRACE_BENCH_REPETITIONS", "3").parse().expect("MILLRACE_BENCH_REPETITIONS");
    let prompts: Vec<String> = QUESTIONS.iter().map(|q| bench.chat(SYSTEM, &[("user", q)])).collect();
    let mut generator = bench.generator();
    println!("\n## static batches: {} new tokens each (EOS ignored), {repetitions} runs\n", new_tokens);
    println!("| batch | prompt tokens | new tokens/s (median) | min | max |");
    println!("|------:|--------------:|----------------------:|----:|----:|");
    let mut rows = Vec::new();
    for &batch in &batches {
        let requests: Vec<_> = (0..batch).map(|i| fixed(prompts[i % prompts.len()].clone(), new_tokens)).collect();
        let mut rates = Vec::new();
        let mut prompt_tokens = 0;
        for _ in 0..repetitions {
            let started = Instant::now();
            let out = generator.generate(&requests, |_, _| ()).expect("generate");
            let seconds = started.elapsed().as_secs_f64();
            assert!(out.iter().all(|g| g.token_ids.len() == new_tokens), "every row generates its full length");
            prompt_tokens = out.iter().map(|g| g.prompt_tokens).sum();
            rates.push((batch * new_tokens) as f64 / seconds);
        }
        let (median, min, max) = median_and_range(rates.clone());
        println!("| {batch:>5} | {prompt_tokens:>13} | {median:>21.1} | {min:>3.1} | {max:>3.1} |");
        rows.push(json!({"batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": batch * new_tokens,
            "new_tokens_per_s": median, "new_tokens_per_s_min": min, "new_tokens_per_s_max": max, "runs": rates}));
    }
    // The same batches for Python onnxruntime (scripts/py/ort-generate-bench.py).
    let spec = generator.spec().clone();
    let entry = bench.manifest.model(&bench.model).expect("model entry");
    let workload = json!({
        "model_file": bench.manifest.path(&entry.model),
        "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "pad_token_id": spec.pad_token_id, "threads": bench.threads, "new_tokens": new_tokens,
        "repetitions": repetitions, "batches": batches,
        "prompts": prompts.iter().map(|p| generator.encode(p).expect("encode")).collect::<Vec<_>>(),
    });
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/engine-workload.json");
    std::fs::create_dir_all(path.parent().expect("folder")).expect("target/bench");
    std::fs::write(&path, serde_json::to_string(&workload).expect("json")).expect("workload file");
    bench.generator = Some(generator);
    json!({"new_tokens": new_tokens, "repetitions": repetitions, "rows": rows})
}

/// One request of the serve workload: when it arrives (from the start) and what it asks.
struct Arrival {
    at: Duration,
    request: GenerationRequest,
}

/// A seeded Poisson schedule at `rate` of prompts of 20–400 tokens and 8–128 new tokens.
fn schedule(bench: &Bench, rate: f64, count: usize) -> Vec<Arrival> {
    let mut rng = StdRng::seed_from_u64(7);
    let generator = bench.generator.as_ref().expect("generator");
    let mut at = Duration::ZERO;
    (0..count)
        .map(|i| {
            at += Duration::from_secs_f64(-rng.random::<f64>().max(1e-9).ln() / rate);
            let target = rng.random_range(20..=400usize);
            let question = QUESTIONS[i % QUESTIONS.len()];
            let mut text = String::new();
            while generator
                .encode(&bench.chat(SYSTEM, &[("user", &format!("{text}{question}"))]))
                .expect("encode")
                .len()
                < target
            {
                text.push_str(PROSE);
            }
            Arrival {
                at,
                request: fixed(
                    bench.chat(SYSTEM, &[("user", &format!("{text}{question}"))]),
                    rng.random_range(8..=128),
                ),
            }
        })
        .collect()
}

/// Serves `arrivals` under `config`; returns (generated tokens/s, TTFTs, end-to-end latencies, seconds).
fn serve(bench: &mut Bench, config: SchedulerConfig, arrivals: &[Arrival]) -> (f64, Vec<f64>, Vec<f64>, f64) {
    let mut scheduler = Scheduler::new(bench.generator(), config).expect("scheduler");
    let n = arrivals.len();
    let (mut first, mut done) = (vec![None; n], vec![None; n]);
    let mut generated = 0usize;
    let start = Instant::now();
    let mut next = 0;
    while next < n || !scheduler.is_idle() {
        let now = start.elapsed();
        while next < n && arrivals[next].at <= now {
            scheduler.submit(next as u64, arrivals[next].request.clone()).expect("submit");
            next += 1;
        }
        if scheduler.is_idle() {
            std::thread::sleep(arrivals[next].at.saturating_sub(now));
            continue;
        }
        scheduler
            .step(|id, event| {
                let (i, t) = (id as usize, start.elapsed());
                match event {
                    Event::Piece(_) => {
                        first[i].get_or_insert(t);
                    }
                    Event::Finished(g) => {
                        generated += g.token_ids.len();
                        done[i] = Some(t);
                    }
                }
            })
            .expect("step");
    }
    let seconds = start.elapsed().as_secs_f64();
    bench.generator = Some(scheduler.into_generator());
    let since = |t: &Option<Duration>, i: usize| (t.expect("every request ran") - arrivals[i].at).as_secs_f64();
    let ttft = first.iter().enumerate().map(|(i, t)| since(t, i)).collect();
    let e2e = done.iter().enumerate().map(|(i, t)| since(t, i)).collect();
    (generated as f64 / seconds, ttft, e2e, seconds)
}

fn scheduler_config(policy: BatchingPolicy, prefix_cache_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        policy,
        max_running: 32,
        kv_budget_tokens: 16_384,
        prefill_chunk_tokens: 128,
        prefix_cache_tokens,
    }
}

fn serve_section(bench: &mut Bench) -> Value {
    let rates: Vec<f64> = list("MILLRACE_BENCH_RATES", "0.2,2");
    let count: usize = env("MILLRACE_BENCH_REQUESTS", "24").parse().expect("MILLRACE_BENCH_REQUESTS");
    println!("\n## serving: {count} Poisson arrivals, prompts 20–400 tokens, 8–128 new tokens (EOS ignored)\n");
    println!("| rate req/s | policy | tokens/s | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | seconds |");
    println!("|-----------:|--------|---------:|------------:|------------:|-----------:|-----------:|--------:|");
    let mut rows = Vec::new();
    for &rate in &rates {
        let arrivals = schedule(bench, rate, count);
        for policy in [BatchingPolicy::Static, BatchingPolicy::Continuous] {
            let (tokens_per_s, ttft, e2e, seconds) = serve(bench, scheduler_config(policy, 0), &arrivals);
            let ms = |xs: &[f64], p| percentile(xs, p) * 1000.0;
            let name = format!("{policy:?}").to_lowercase();
            println!(
                "| {rate:>10} | {name} | {tokens_per_s:>8.1} | {:>11.0} | {:>11.0} | {:>10.0} | {:>10.0} | {seconds:>7.1} |",
                ms(&ttft, 0.5),
                ms(&ttft, 0.99),
                ms(&e2e, 0.5),
                ms(&e2e, 0.99)
            );
            rows.push(json!({"rate": rate, "policy": name, "tokens_per_s": tokens_per_s,
                "ttft_p50_ms": ms(&ttft, 0.5), "ttft_p99_ms": ms(&ttft, 0.99),
                "e2e_p50_ms": ms(&e2e, 0.5), "e2e_p99_ms": ms(&e2e, 0.99), "seconds": seconds}));
        }
    }
    json!({"requests": count, "rows": rows})
}

/// Runs `request` to its end; returns its text.
fn answer(scheduler: &mut Scheduler, request: GenerationRequest) -> String {
    scheduler.submit(0, request).expect("submit");
    let mut text = String::new();
    while !scheduler.is_idle() {
        scheduler
            .step(|_, e| {
                if let Event::Finished(g) = e {
                    text = g.text;
                }
            })
            .expect("step");
    }
    text
}

/// Time to the first token of `request` on a scheduler holding what `before` left in its cache,
/// and how many of its prompt tokens were reused.
fn first_token(
    bench: &mut Bench,
    cache_tokens: usize,
    before: &[GenerationRequest],
    request: GenerationRequest,
) -> (Duration, usize) {
    let mut scheduler = Scheduler::new(bench.generator(), scheduler_config(BatchingPolicy::Continuous, cache_tokens))
        .expect("scheduler");
    for earlier in before {
        answer(&mut scheduler, earlier.clone());
    }
    let started = Instant::now();
    scheduler.submit(99, request).expect("submit");
    let mut ttft = None;
    let mut cached = 0;
    while !scheduler.is_idle() {
        scheduler
            .step(|_, e| match e {
                Event::Piece(_) => {
                    ttft.get_or_insert(started.elapsed());
                }
                Event::Finished(g) => cached = g.cached_tokens,
            })
            .expect("step");
    }
    bench.generator = Some(scheduler.into_generator());
    (ttft.expect("a first token"), cached)
}

fn prefix_section(bench: &mut Bench) -> Value {
    let long = PROSE.repeat(5);
    let turn1 = format!("{long} What does the wheel do?");
    let turn2 = format!("{long} And what happens in winter when the river freezes?");
    let turn3 = "Summarise our conversation in one sentence.";
    // Turns 1 and 2 run first, as a session would send them; turn 3 carries their answers.
    let earlier = {
        let mut scheduler =
            Scheduler::new(bench.generator(), scheduler_config(BatchingPolicy::Continuous, 0)).expect("scheduler");
        let first_prompt = bench.chat(SYSTEM, &[("user", &turn1)]);
        let first = answer(&mut scheduler, fixed(first_prompt.clone(), 24));
        let second_prompt = bench.chat(SYSTEM, &[("user", &turn1), ("assistant", &first), ("user", &turn2)]);
        let second = answer(&mut scheduler, fixed(second_prompt.clone(), 24));
        bench.generator = Some(scheduler.into_generator());
        [(first_prompt, first), (second_prompt, second)]
    };
    let third = bench.chat(
        SYSTEM,
        &[
            ("user", &turn1),
            ("assistant", &earlier[0].1),
            ("user", &turn2),
            ("assistant", &earlier[1].1),
            ("user", turn3),
        ],
    );
    let earlier: Vec<GenerationRequest> = earlier.into_iter().map(|(prompt, _)| fixed(prompt, 24)).collect();
    let tokens = bench.generator.as_ref().expect("generator").encode(&third).expect("encode").len();
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut reused = 0;
    for _ in 0..3 {
        let (t, cached) = first_token(bench, 16_384, &earlier, fixed(third.clone(), 8));
        with.push(t.as_secs_f64() * 1000.0);
        reused = cached;
        let (t, _) = first_token(bench, 0, &[], fixed(third.clone(), 8));
        without.push(t.as_secs_f64() * 1000.0);
    }
    let (with, without) = (median_and_range(with).0, median_and_range(without).0);
    println!("\n## prefix reuse: turn 3 of a conversation of {tokens} prompt tokens\n");
    println!("| prefix cache | prompt tokens reused | TTFT ms (median of 3) |");
    println!("|--------------|---------------------:|----------------------:|");
    println!("| off          | {:>20} | {without:>21.0} |", 0);
    println!("| on           | {reused:>20} | {with:>21.0} |");
    println!("ratio on/off: {:.2}", with / without);
    json!({"prompt_tokens": tokens, "reused_tokens": reused, "ttft_ms_cache_on": with, "ttft_ms_cache_off": without,
        "ratio": with / without})
}

fn main() {
    let dir = PathBuf::from(env("MILLRACE_MODELS_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/prepared")));
    let model = env("MILLRACE_MODEL", "smollm2-135m");
    let provider = env("MILLRACE_PROVIDER", "cpu");
    let threads: usize = env("MILLRACE_INTRA_THREADS", "0").parse().expect("MILLRACE_INTRA_THREADS");
    let options = RuntimeOptions {
        provider: provider.parse().expect("MILLRACE_PROVIDER"),
        intra_threads: threads,
        ..Default::default()
    };
    let manifest = Manifest::load(&dir).expect("manifest");
    let template = manifest.chat_template(&model).expect("chat template");
    let mut generator = manifest.generator(&model, &options).expect("generator");
    // Warm-up: first runs allocate and pick kernels.
    generator.generate(&[GenerationRequest::new(QUESTIONS[0], 4)], |_, _| ()).expect("warm-up");
    let mut bench = Bench {
        model: model.clone(),
        provider: provider.clone(),
        threads,
        manifest,
        template,
        generator: Some(generator),
    };
    println!(
        "\n# Millrace engine: {model}, provider {provider}, intra-op threads {threads} (0 = ONNX Runtime's choice)"
    );
    let mut report = json!({"model": bench.model, "provider": bench.provider, "threads": threads});
    for section in env("MILLRACE_BENCH_SECTIONS", "static,serve,prefix").split(',') {
        let figures = match section.trim() {
            "static" => static_section(&mut bench),
            "serve" => serve_section(&mut bench),
            "prefix" => prefix_section(&mut bench),
            other => panic!("unknown section {other:?} (static, serve, prefix)"),
        };
        report[section.trim()] = figures;
    }
    if let Ok(path) = std::env::var("MILLRACE_BENCH_JSON") {
        let text = serde_json::to_string_pretty(&report).expect("bench report");
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("MILLRACE_BENCH_JSON={path}: {e}"));
    }
}

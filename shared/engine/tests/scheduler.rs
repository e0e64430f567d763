//! The iteration-level scheduler on the real SmolLM2 model and the real ONNX Runtime: a request's
//! greedy tokens are the same whether it runs alone, joins a running set mid-way, has its
//! prefill chunked, or reuses a cached prefix; cancel and deadlines stop one sequence; the KV
//! budget bounds admission; streamed pieces make the final text.
//!
//! Env: see `common`.
mod common;

use common::{MODEL, SYSTEM, chat, manifest, options};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use millrace_engine::{
    BatchingPolicy, ChatMessage, Event, FinishReason, Generation, GenerationRequest, Scheduler, SchedulerConfig,
    SequenceId,
};

const CONFIG: SchedulerConfig = SchedulerConfig {
    policy: BatchingPolicy::Continuous,
    max_running: 8,
    kv_budget_tokens: 16_384,
    prefill_chunk_tokens: 512,
    prefix_cache_tokens: 0,
};

fn scheduler(config: SchedulerConfig) -> Scheduler {
    Scheduler::new(manifest().generator(MODEL, &options()).unwrap(), config).unwrap()
}

/// What one sequence produced: its streamed text and its generation.
#[derive(Default)]
struct Seen {
    streamed: HashMap<SequenceId, String>,
    done: HashMap<SequenceId, Generation>,
}

impl Seen {
    fn step(&mut self, scheduler: &mut Scheduler) -> millrace_engine::StepReport {
        scheduler
            .step(|id, event| match event {
                Event::Piece(piece) => self.streamed.entry(id).or_default().push_str(piece),
                Event::Finished(g) => assert!(self.done.insert(id, g).is_none(), "{id} finished twice"),
            })
            .unwrap()
    }

    fn run_to_end(&mut self, scheduler: &mut Scheduler) {
        while !scheduler.is_idle() {
            self.step(scheduler);
        }
    }
}

/// Greedy tokens of `prompt` generated alone.
fn alone(prompt: &str, max_new_tokens: usize) -> Vec<u32> {
    let mut s = scheduler(CONFIG);
    s.submit(0, GenerationRequest::new(prompt, max_new_tokens)).unwrap();
    let mut seen = Seen::default();
    seen.run_to_end(&mut s);
    seen.done.remove(&0).unwrap().token_ids
}

#[test]
fn a_request_gets_the_same_tokens_alone_joining_mid_way_and_chunked() {
    let prompts = [chat("Count from one to twenty in words."), chat("What is the capital of France?"), chat("Hi!")];
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| alone(p, 16)).collect();
    // Chunks of 7 tokens: every prompt is prefilled over several steps while others decode.
    let mut s = scheduler(SchedulerConfig { prefill_chunk_tokens: 7, ..CONFIG });
    let mut seen = Seen::default();
    s.submit(0, GenerationRequest::new(prompts[0].clone(), 16)).unwrap();
    for _ in 0..12 {
        seen.step(&mut s);
    }
    assert!(seen.streamed.contains_key(&0), "the first request is decoding before the others arrive");
    s.submit(1, GenerationRequest::new(prompts[1].clone(), 16)).unwrap();
    seen.step(&mut s);
    s.submit(2, GenerationRequest::new(prompts[2].clone(), 16)).unwrap();
    seen.run_to_end(&mut s);
    for (id, tokens) in expected.iter().enumerate() {
        let g = &seen.done[&(id as u64)];
        assert_eq!(&g.token_ids, tokens, "request {id}");
        assert_eq!(seen.streamed.get(&(id as u64)).cloned().unwrap_or_default(), g.text, "pieces make the text");
    }
}

#[test]
fn a_reused_prefix_gives_the_same_tokens_and_skips_its_prefill() {
    let first = chat("Name a river in Europe.");
    let mut s = scheduler(SchedulerConfig { prefix_cache_tokens: 4096, ..CONFIG });
    let mut seen = Seen::default();
    s.submit(0, GenerationRequest::new(first.clone(), 12)).unwrap();
    seen.run_to_end(&mut s);
    let answer = seen.done[&0].text.clone();
    // The next turn of the same conversation starts with the first turn and its answer.
    let template = manifest().chat_template(MODEL).unwrap();
    let second = template
        .render(
            &[
                ChatMessage::new("system", SYSTEM),
                ChatMessage::new("user", "Name a river in Europe."),
                ChatMessage::new("assistant", &answer),
                ChatMessage::new("user", "How long is it?"),
            ],
            true,
        )
        .unwrap();
    s.submit(1, GenerationRequest::new(second.clone(), 12)).unwrap();
    let report = seen.step(&mut s);
    seen.run_to_end(&mut s);
    let reused = seen.done[&1].cached_tokens;
    assert_eq!(report.prefix_hits, 1);
    assert_eq!(report.cached_tokens, reused);
    assert!(
        reused >= seen.done[&0].prompt_tokens,
        "at least the first prompt is reused: {reused} of {}",
        seen.done[&1].prompt_tokens
    );
    assert_eq!(report.prefill_tokens, seen.done[&1].prompt_tokens - reused, "only the new tokens are computed");
    assert_eq!(seen.done[&1].token_ids, alone(&second, 12), "cached = uncached");
    // A different question with the same system prompt reuses the system prompt.
    s.submit(2, GenerationRequest::new(chat("What is two plus two?"), 4)).unwrap();
    seen.run_to_end(&mut s);
    assert!(seen.done[&2].cached_tokens > 10, "{}", seen.done[&2].cached_tokens);
}

#[test]
fn cancel_stops_one_sequence_within_a_step_and_the_others_go_on() {
    let prompts = [chat("Count from one to fifty in words."), chat("What is the capital of France?")];
    let expected = alone(&prompts[1], 20);
    let mut s = scheduler(CONFIG);
    let cancelled = GenerationRequest::new(prompts[0].clone(), 40);
    let flag = cancelled.cancel.clone();
    s.submit(0, cancelled).unwrap();
    s.submit(1, GenerationRequest::new(prompts[1].clone(), 20)).unwrap();
    let mut seen = Seen::default();
    for _ in 0..3 {
        seen.step(&mut s);
    }
    flag.store(true, Ordering::Relaxed);
    let tokens_then = seen.streamed.get(&0).map_or(0, String::len);
    seen.step(&mut s);
    let g = &seen.done[&0];
    assert_eq!(g.finish, FinishReason::Cancelled, "ended at the next step");
    assert_eq!(g.text.len(), tokens_then, "no token was generated for it after the cancel");
    seen.run_to_end(&mut s);
    assert_eq!(seen.done[&1].token_ids, expected);
}

#[test]
fn a_deadline_ends_a_waiting_and_a_running_sequence() {
    let mut s = scheduler(SchedulerConfig { max_running: 1, ..CONFIG });
    let mut running = GenerationRequest::new(chat("Count from one to fifty in words."), 200);
    running.deadline = Some(Instant::now() + Duration::from_millis(600));
    let mut waiting = GenerationRequest::new(chat("Hi!"), 8);
    waiting.deadline = Some(Instant::now() + Duration::from_millis(300));
    s.submit(0, running).unwrap();
    s.submit(1, waiting).unwrap();
    let mut seen = Seen::default();
    seen.run_to_end(&mut s);
    assert_eq!(seen.done[&0].finish, FinishReason::Deadline);
    assert!(!seen.done[&0].token_ids.is_empty());
    assert_eq!(seen.done[&1].finish, FinishReason::Deadline, "never admitted: one running at most");
    assert!(seen.done[&1].token_ids.is_empty());
}

#[test]
fn the_kv_budget_bounds_what_runs_at_once_and_the_rest_waits_its_turn() {
    let manifest = manifest();
    let context = manifest.model(MODEL).unwrap().decoder_spec().unwrap().context_length;
    // Room for two sequences of this size, not three.
    let prompt = chat("Say hello.");
    let mut s = scheduler(SchedulerConfig { kv_budget_tokens: context.max(2 * 200), ..CONFIG });
    let reserve = s.config().kv_budget_tokens / 2 - s.generator().encode(&prompt).unwrap().len();
    for id in 0..6 {
        s.submit(id, GenerationRequest::new(prompt.clone(), reserve)).unwrap();
    }
    let mut seen = Seen::default();
    let mut most = 0;
    while !s.is_idle() {
        seen.step(&mut s);
        let load = s.load();
        assert!(load.kv_used_tokens <= load.kv_budget_tokens, "{load:?}");
        most = most.max(load.running);
    }
    assert_eq!(most, 2);
    assert_eq!(seen.done.len(), 6, "everyone ran in the end");
    let too_big = GenerationRequest::new(prompt.repeat(context / 4), 1);
    assert!(s.submit(9, too_big).is_err(), "a prompt over the context is refused alone");
}

#[test]
fn the_static_policy_admits_only_when_nothing_runs() {
    let mut s = scheduler(SchedulerConfig { policy: BatchingPolicy::Static, ..CONFIG });
    s.submit(0, GenerationRequest::new(chat("Count from one to twenty in words."), 24)).unwrap();
    let mut seen = Seen::default();
    seen.step(&mut s);
    s.submit(1, GenerationRequest::new(chat("Hi!"), 4)).unwrap();
    while !seen.done.contains_key(&0) {
        seen.step(&mut s);
        assert!(!seen.streamed.contains_key(&1), "the second waits for the whole first batch");
    }
    seen.run_to_end(&mut s);
    assert_eq!(seen.done[&1].token_ids, alone(&chat("Hi!"), 4));
}

//! The engine on the real prepared models and the real ONNX Runtime
//! (`scripts/prepare-models.sh` prepares them; `scripts/test.sh` runs it first).
//! Env: see `common`.
mod common;

use common::{MODEL, chat, manifest, options};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use millrace_engine::embed::cosine;
use millrace_engine::{FinishReason, GenerationRequest, Generator, OutputGrammar, RuntimeOptions, SamplingParams};

fn generator() -> Generator {
    manifest().generator(MODEL, &options()).unwrap()
}

fn greedy(generator: &mut Generator, prompts: &[&str], max_new_tokens: usize) -> Vec<millrace_engine::Generation> {
    let requests: Vec<_> = prompts.iter().map(|p| GenerationRequest::new(*p, max_new_tokens)).collect();
    generator.generate(&requests, |_, _| ()).unwrap()
}

#[test]
fn the_greedy_answer_to_the_capital_of_france_names_paris() {
    let mut g = generator();
    let mut streamed = String::new();
    let out = g
        .generate(&[GenerationRequest::new(chat("What is the capital of France?"), 32)], |_, piece| {
            streamed.push_str(piece)
        })
        .unwrap();
    assert!(out[0].text.contains("Paris"), "{:?}", out[0].text);
    assert_eq!(streamed, out[0].text, "the streamed pieces make the final text");
    assert!(out[0].prompt_tokens > 10);
}

#[test]
fn generation_with_the_kv_cache_equals_generation_without_it() {
    let mut g = generator();
    let prompt = chat("Name three colours.");
    let cached = greedy(&mut g, &[&prompt], 16).remove(0).token_ids;
    let mut uncached = g.generate_uncached(&prompt, 16).unwrap();
    uncached.retain(|t| !g.spec().eos_token_ids.contains(t));
    assert_eq!(cached, uncached);
}

#[test]
fn a_batch_of_different_lengths_gives_each_prompt_its_tokens_alone() {
    let mut g = generator();
    let prompts = [
        chat("Hi!"),
        chat("What is the capital of France? Answer in one word."),
        chat("Write a haiku about rivers and mills."),
    ];
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let batched = greedy(&mut g, &refs, 12);
    for (prompt, together) in refs.iter().zip(&batched) {
        let alone = greedy(&mut g, &[prompt], 12).remove(0);
        assert_eq!(together.token_ids, alone.token_ids, "prompt {prompt:?}");
    }
}

#[test]
fn sampling_with_a_seed_is_reproducible_and_seeds_differ() {
    let mut g = generator();
    let sample = |g: &mut Generator, seed| {
        let mut r = GenerationRequest::new(chat("Tell me a story about a dragon."), 16);
        r.sampling = SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.95, seed, ..Default::default() };
        g.generate(&[r], |_, _| ()).unwrap().remove(0).token_ids
    };
    assert_eq!(sample(&mut g, 7), sample(&mut g, 7));
    assert_ne!(sample(&mut g, 7), sample(&mut g, 8));
}

#[test]
fn cancelling_one_request_stops_it_and_the_others_finish_unchanged() {
    let mut g = generator();
    let prompts = [chat("Count from one to fifty in words."), chat("What is the capital of France?")];
    let requests: Vec<_> = prompts.iter().map(|p| GenerationRequest::new(p.clone(), 20)).collect();
    let cancel = Arc::clone(&requests[0].cancel);
    let mut pieces_of_first = 0;
    let out = g
        .generate(&requests, |i, _| {
            if i == 0 {
                pieces_of_first += 1;
                if pieces_of_first == 3 {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        })
        .unwrap();
    assert_eq!(out[0].finish, FinishReason::Cancelled);
    assert!(out[0].token_ids.len() <= 4, "stopped right after the cancel: {:?}", out[0].token_ids);
    let alone = greedy(&mut g, &[&prompts[1]], 20).remove(0);
    assert_eq!(out[1].token_ids, alone.token_ids);
    assert_ne!(out[1].finish, FinishReason::Cancelled);
}

#[test]
fn a_stop_string_ends_generation_without_the_stop_string() {
    let mut g = generator();
    let mut r = GenerationRequest::new(chat("What is the capital of France?"), 32);
    r.stop = vec!["Paris".into()];
    let mut streamed = String::new();
    let out = g.generate(&[r], |_, piece| streamed.push_str(piece)).unwrap().remove(0);
    assert_eq!(out.finish, FinishReason::Stop, "{:?}", out.text);
    assert!(!out.text.contains("Paris") && out.text.contains("France"), "{:?}", out.text);
    assert_eq!(streamed, out.text, "no part of the stop string was streamed");
}

#[test]
fn related_sentences_embed_closer_than_unrelated_ones() {
    let mut e = manifest().embedder("minilm-l6", &options()).unwrap();
    let v = e
        .embed(&["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."])
        .unwrap();
    let v: Vec<&[f32]> = v.iter().map(|e| e.vector.as_slice()).collect();
    assert_eq!(v[0].len(), 384);
    assert!(cosine(v[0], v[1]) > cosine(v[0], v[2]) + 0.1, "{} vs {}", cosine(v[0], v[1]), cosine(v[0], v[2]));
}

#[test]
fn the_classifier_scores_abuse_above_a_benign_sentence() {
    let mut c = manifest().classifier("profanity", &options()).unwrap();
    let s = c.scores(&["you are a fucking idiot", "have a lovely afternoon"]).unwrap();
    assert!(s[0] > 0.5 && s[1] < 0.5, "{s:?}");
}

#[test]
fn the_bound_kv_cache_path_generates_the_same_tokens() {
    // The path a GPU takes (IoBinding, finished rows kept in the batch), run on the CPU.
    let bound_options = RuntimeOptions { bind_kv: true, ..options() };
    let mut bound = manifest().generator(MODEL, &bound_options).unwrap();
    let mut plain = generator();
    let prompts = [chat("Hi!"), chat("What is the capital of France?"), chat("Write a haiku about rivers and mills.")];
    // Different lengths so rows finish at different steps.
    let requests: Vec<_> = prompts.iter().zip([4, 16, 10]).map(|(p, n)| GenerationRequest::new(p.clone(), n)).collect();
    let with_binding = bound.generate(&requests, |_, _| ()).unwrap();
    let without = plain.generate(&requests, |_, _| ()).unwrap();
    assert_eq!(with_binding, without);
}

#[test]
fn a_json_schema_constrains_the_output_to_a_matching_object() {
    let mut g = generator();
    let schema = r#"{"type":"object","properties":{"city":{"type":"string","maxLength":24},
        "country":{"type":"string","maxLength":24},"population_millions":{"type":"integer"}},
        "required":["city","country","population_millions"],"additionalProperties":false}"#;
    let mut r = GenerationRequest::new(chat("Describe Paris as JSON."), 64);
    r.grammar = Some(OutputGrammar::JsonSchema(schema.into()));
    let free = GenerationRequest::new(chat("Describe Paris as JSON."), 16);
    let out = g.generate(&[r, free.clone()], |_, _| ()).unwrap();
    assert_eq!(out[0].finish, FinishReason::Eos, "{:?}", out[0].text);
    eprintln!("constrained output: {}", out[0].text);
    let value: serde_json::Value =
        serde_json::from_str(&out[0].text).unwrap_or_else(|e| panic!("{e}: {:?}", out[0].text));
    let object = value.as_object().unwrap();
    assert_eq!(object.len(), 3, "{value}");
    assert!(object["city"].is_string() && object["country"].is_string() && object["population_millions"].is_i64());
    // The unconstrained row in the same batch is as it is alone.
    let alone = g.generate(&[free], |_, _| ()).unwrap();
    assert_eq!(out[1].token_ids, alone[0].token_ids);

    // A schema that does not compile refuses its request alone.
    let mut bad = GenerationRequest::new(chat("Hi"), 8);
    bad.grammar = Some(OutputGrammar::JsonSchema(r#"{"type": 12}"#.into()));
    let out = g.generate(&[bad, GenerationRequest::new(chat("Hi"), 4)], |_, _| ()).unwrap();
    assert_eq!(out[0].finish, FinishReason::Refused);
    assert!(out[0].refusal.as_deref().is_some_and(|r| r.contains("response format")), "{:?}", out[0].refusal);
    assert!(!out[1].token_ids.is_empty());
}

#[test]
fn logprobs_are_the_models_distribution_and_greedy_takes_the_top_one() {
    let mut g = generator();
    let mut r = GenerationRequest::new(chat("What is the capital of France?"), 8);
    r.logprobs = Some(3);
    let out = g.generate(&[r], |_, _| ()).unwrap().remove(0);
    assert_eq!(out.logprobs.len(), out.token_ids.len(), "one entry per generated token");
    for t in &out.logprobs {
        assert!(t.logprob <= 0.0 && t.top.len() == 3, "{t:?}");
        assert!(t.top.windows(2).all(|w| w[0].1 >= w[1].1), "alternatives most likely first: {t:?}");
        assert_eq!((t.top[0].0.as_str(), t.top[0].1), (t.token.as_str(), t.logprob), "greedy picks the most likely");
        assert!(t.top.iter().map(|(_, l)| l.exp()).sum::<f32>() <= 1.0 + 1e-4);
    }
    assert_eq!(out.logprobs.iter().map(|t| t.token.as_str()).collect::<String>(), out.text);
}

#[test]
fn a_lark_grammar_lets_the_output_be_a_call_or_plain_text() {
    let mut g = generator();
    let call = r#"{"type":"object","properties":{"name":{"const":"get_weather"},"arguments":{"type":"object",
        "properties":{"city":{"type":"string","maxLength":24}},"required":["city"],"additionalProperties":false}},
        "required":["name","arguments"],"additionalProperties":false}"#;
    let grammar = format!("start: call | answer\ncall: %json {call}\nanswer: /[^{{](?s:.*)/");
    for question in ["What is the weather in Oslo? Call get_weather.", "Say hello."] {
        let mut r = GenerationRequest::new(chat(question), 48);
        r.grammar = Some(OutputGrammar::Lark(grammar.clone()));
        let out = g.generate(&[r], |_, _| ()).unwrap().remove(0);
        eprintln!("{question:?} -> {:?} ({:?})", out.text, out.finish);
        match serde_json::from_str::<serde_json::Value>(&out.text) {
            Ok(v) => assert_eq!(v["name"], "get_weather", "a call matches its schema: {v}"),
            Err(_) => assert!(!out.text.starts_with('{'), "plain text never opens like a call: {:?}", out.text),
        }
    }
}

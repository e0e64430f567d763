//! From a request's parameters to the engine's `GenerationRequest`, and the checks a request
//! must pass before it may join a batch (pure: no models, no NATS).
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use millrace_engine::{GenerationRequest, OutputGrammar, SamplingParams};
use millrace_proto::v1::GenerationParams;

/// Why a request cannot be generated; it is answered alone and the rest of its batch goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("a prompt of {tokens} tokens does not fit the model's context of {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("model {requested:?} is not served here (this process serves {served:?})")]
    UnknownModel { requested: String, served: String },
}

impl Rejection {
    /// The machine-readable reason (terminal results, gRPC status messages).
    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyPrompt => "empty_prompt",
            Self::PromptTooLong { .. } => "prompt_too_long",
            Self::UnknownModel { .. } => "unknown_model",
        }
    }
}

/// A model name asked for against the one served; empty means "the served one".
pub fn check_model(requested: &str, served: &str) -> Result<(), Rejection> {
    if requested.is_empty() || requested == served {
        Ok(())
    } else {
        Err(Rejection::UnknownModel { requested: requested.to_owned(), served: served.to_owned() })
    }
}

/// Whether a tokenized prompt can run, by the same rule the engine enforces for a whole batch
/// (a prompt failing it would fail every request batched with it).
pub fn check_fit(prompt_tokens: usize, max_new_tokens: usize, context_length: usize) -> Result<(), Rejection> {
    if prompt_tokens == 0 {
        Err(Rejection::EmptyPrompt)
    } else if prompt_tokens + max_new_tokens.min(1) > context_length {
        Err(Rejection::PromptTooLong { tokens: prompt_tokens, context: context_length })
    } else {
        Ok(())
    }
}

/// The seed of a request that names none, from its request id (FNV-1a: stable across builds,
/// unlike std's hasher), so a redelivered batch samples the same tokens again.
pub fn seed_from_request_id(request_id: &str) -> u64 {
    request_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Service-wide fallbacks for parameters a request leaves unset.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub max_new_tokens: usize,
}

/// The engine request for `prompt` under the client's `params`. proto3 zeroes mean "not given":
/// `max_new_tokens` 0 takes the default, `top_k` 0 is no cut, an absent temperature is greedy,
/// an absent `top_p` is no nucleus cut and an absent seed is `fallback_seed`.
pub fn generation_request(
    prompt: String,
    params: Option<&GenerationParams>,
    defaults: Defaults,
    fallback_seed: u64,
    deadline: Option<Instant>,
    cancel: Arc<AtomicBool>,
) -> GenerationRequest {
    let p = params.cloned().unwrap_or_default();
    GenerationRequest {
        prompt,
        max_new_tokens: if p.max_new_tokens == 0 { defaults.max_new_tokens } else { p.max_new_tokens as usize },
        sampling: SamplingParams {
            temperature: p.temperature.unwrap_or(0.0),
            top_k: p.top_k as usize,
            top_p: p.top_p.unwrap_or(1.0),
            seed: p.seed.unwrap_or(fallback_seed),
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            logit_bias: p.logit_bias.into_iter().collect(),
        },
        // An empty stop string matches at once and would truncate every answer to nothing.
        stop: p.stop.into_iter().filter(|s| !s.is_empty()).collect(),
        deadline,
        cancel,
        grammar: match (p.json_schema.is_empty(), p.lark_grammar.is_empty()) {
            (false, _) => Some(OutputGrammar::JsonSchema(p.json_schema)),
            (true, false) => Some(OutputGrammar::Lark(p.lark_grammar)),
            (true, true) => None,
        },
        logprobs: p.logprobs.then_some(p.top_logprobs as usize),
        ignore_eos: p.ignore_eos,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    const DEFAULTS: Defaults = Defaults { max_new_tokens: 64 };

    #[test]
    fn unset_parameters_take_the_service_defaults() {
        let r = generation_request("hi".into(), None, DEFAULTS, 7, None, Arc::default());
        assert_eq!(r.max_new_tokens, 64);
        assert_eq!(
            r.sampling,
            SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 7, ..Default::default() }
        );
        assert!(r.stop.is_empty() && r.deadline.is_none() && !r.cancel.load(Ordering::Relaxed));
        let zeroes = GenerationParams::default();
        let r = generation_request("hi".into(), Some(&zeroes), DEFAULTS, 7, None, Arc::default());
        assert_eq!((r.max_new_tokens, r.sampling.temperature, r.sampling.top_p), (64, 0.0, 1.0));
    }

    #[test]
    fn given_parameters_are_kept_and_empty_stops_dropped() {
        let params = GenerationParams {
            max_new_tokens: 5,
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: 40,
            seed: Some(3),
            stop: vec!["\n\n".into(), String::new()],
            presence_penalty: 0.5,
            frequency_penalty: -0.25,
            json_schema: r#"{"type":"object"}"#.into(),
            logprobs: true,
            top_logprobs: 3,
            logit_bias: [(42, -100.0)].into(),
            lark_grammar: String::new(),
            ignore_eos: true,
        };
        let cancel = Arc::new(AtomicBool::new(true));
        let deadline = Some(Instant::now());
        let r = generation_request("hi".into(), Some(&params), DEFAULTS, 7, deadline, cancel.clone());
        assert_eq!(r.max_new_tokens, 5);
        assert_eq!(
            r.sampling,
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                seed: 3,
                presence_penalty: 0.5,
                frequency_penalty: -0.25,
                logit_bias: vec![(42, -100.0)],
            }
        );
        assert_eq!(r.stop, ["\n\n"]);
        assert_eq!(r.grammar, Some(OutputGrammar::JsonSchema(r#"{"type":"object"}"#.into())));
        assert_eq!(r.logprobs, Some(3));
        assert!(r.ignore_eos);
        assert_eq!(r.deadline, deadline);
        assert!(Arc::ptr_eq(&r.cancel, &cancel));
        // An explicit temperature 0 is greedy, as the proto's `optional` allows.
        let greedy = GenerationParams { temperature: Some(0.0), ..params };
        assert_eq!(
            generation_request("hi".into(), Some(&greedy), DEFAULTS, 7, None, Arc::default()).sampling.temperature,
            0.0
        );
    }

    #[test]
    fn seeds_from_request_ids_are_stable_and_distinct() {
        assert_eq!(seed_from_request_id("0190-a"), seed_from_request_id("0190-a"));
        assert_ne!(seed_from_request_id("0190-a"), seed_from_request_id("0190-b"));
        // FNV-1a's published test vector: the value must not change between builds.
        assert_eq!(seed_from_request_id("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn admission_rules() {
        assert_eq!(check_fit(0, 10, 100), Err(Rejection::EmptyPrompt));
        assert_eq!(check_fit(99, 10, 100), Ok(()));
        assert_eq!(check_fit(100, 10, 100).unwrap_err().code(), "prompt_too_long");
        assert_eq!(check_fit(100, 0, 100), Ok(()));
        assert_eq!(check_model("", "m"), Ok(()));
        assert_eq!(check_model("m", "m"), Ok(()));
        assert_eq!(check_model("x", "m").unwrap_err().code(), "unknown_model");
    }
}

//! Constrained decoding: a JSON schema compiled by llguidance (the structured-output engine
//! behind several serving stacks) into the set of tokens the output may continue with at each
//! step, so even a small model's output always parses and matches the schema.
//!
//! Why llguidance: it is maintained, built for exactly this (JSON schema → per-token masks over
//! a real vocabulary), fast enough to run every step on a CPU, and needs no Python; the
//! vocabulary is read from the model's own `tokenizer.json`.
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::EngineError;

fn invalid(e: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidRequest(format!("response format: {e}"))
}

/// What an output must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputGrammar {
    /// A JSON schema (`{"type": "object"}` for OpenAI's JSON mode).
    JsonSchema(String),
    /// A grammar in llguidance's Lark syntax (which can embed JSON schemas with `%json`).
    Lark(String),
}

/// Compiles schemas for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// The vocabulary of `tokenizer` (padded to the model's `vocab_size`), ending on `eos`.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos: u32) -> Result<Self, EngineError> {
        let json = tokenizer.to_string(false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let json: Value = serde_json::from_str(&json).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        words.resize(vocab_size.max(words.len()), Vec::new());
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| EngineError::Model(e.to_string()))?;
        factory.set_stderr_log_level(0);
        Ok(Self { factory })
    }

    /// A fresh constraint for one output. A grammar that does not compile is an invalid request.
    pub fn constraint(&self, grammar: &OutputGrammar) -> Result<Constraint, EngineError> {
        let grammar = match grammar {
            OutputGrammar::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(serde_json::from_str::<Value>(schema).map_err(invalid)?)
            }
            OutputGrammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(invalid)?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(invalid(e)),
            None => Ok(Constraint(matcher)),
        }
    }
}

/// One output's grammar state.
pub struct Constraint(Matcher);

impl Constraint {
    /// Lowers every token the grammar does not allow now to −∞ (only EOS once it is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let allowed = self.0.compute_mask_or_eos().map_err(|e| EngineError::Model(format!("constraint: {e}")))?;
        for (token, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(token as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past a sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), EngineError> {
        self.0.consume_token(token).map_err(|e| EngineError::Model(format!("constraint: {e}")))
    }
}

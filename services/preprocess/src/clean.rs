//! The stage's logic, free of NATS: one query text in, a cleaned text (or a rejection) out.
//!
//! 1. [`normalize`](crate::normalize::normalize) (NFKC, invisible characters, whitespace).
//! 2. Empty after that → `empty_text`.
//! 3. Longer than `max_chars` characters (Unicode scalar values, after normalization) →
//!    `text_too_long`.
//! 4. A model that is not one of the manifest's generation models → `unknown_model`.
//! 5. PII redaction into placeholders.
//! 6. Token count of the *redacted* text (what goes downstream) with the model's tokenizer;
//!    budget = context length − `reserve_tokens`. Past it: `too_many_tokens`, or, with the
//!    truncate policy, the first tokens within budget (a placeholder cut in half at the end is
//!    dropped whole) and `truncated = true`.
use std::collections::BTreeMap;

use crate::budget::{BudgetError, TokenModels};
use crate::normalize::normalize;
use crate::pii::{Detectors, Redactor};

/// What to do with a text over its token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Overflow {
    /// REJECTED `too_many_tokens`.
    Reject,
    /// Keep the first tokens within budget; `truncated = true`.
    Truncate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_chars: usize,
    pub reserve_tokens: usize,
    pub overflow: Overflow,
    pub detectors: Detectors,
}

/// A query's text, ready for moderation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub text: String,
    pub token_count: u32,
    pub truncated: bool,
    /// Placeholders written, per PII kind name (`email`, `phone` …).
    pub redactions: BTreeMap<String, u32>,
}

/// Why a query is refused: the client's input, not a fault of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error(
        "the text is empty after normalization ({original_chars} characters before, all whitespace, control or zero-width)"
    )]
    EmptyText { original_chars: usize },
    #[error("the text has {chars} characters after normalization; at most {max} are accepted")]
    TextTooLong { chars: usize, max: usize },
    #[error("model {model:?} is not a generation model of this mesh (known: {known})")]
    UnknownModel { model: String, known: String },
    #[error(
        "the text is {tokens} tokens for model {model}; the budget is {budget} (context {context} − {reserve} reserved for the template and the answer)"
    )]
    TooManyTokens { model: String, tokens: usize, budget: usize, context: usize, reserve: usize },
}

impl Rejection {
    /// The machine-readable reason code on the REJECTED result.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::EmptyText { .. } => "empty_text",
            Rejection::TextTooLong { .. } => "text_too_long",
            Rejection::UnknownModel { .. } => "unknown_model",
            Rejection::TooManyTokens { .. } => "too_many_tokens",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The tokenizer failed on this text: a fault here, not the client's.
    #[error(transparent)]
    Tokenizer(#[from] BudgetError),
}

pub struct Preprocessor {
    policy: Policy,
    redactor: Redactor,
    models: TokenModels,
}

impl Preprocessor {
    pub fn new(policy: Policy, models: TokenModels) -> Self {
        Self { policy, redactor: Redactor::new(policy.detectors), models }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn models(&self) -> &TokenModels {
        &self.models
    }

    pub fn process(&self, model: &str, text: &str) -> Result<Cleaned, PreprocessError> {
        let normalized = normalize(text);
        if normalized.is_empty() {
            return Err(Rejection::EmptyText { original_chars: text.chars().count() }.into());
        }
        let chars = normalized.chars().count();
        if chars > self.policy.max_chars {
            return Err(Rejection::TextTooLong { chars, max: self.policy.max_chars }.into());
        }
        let Some(tokenizer) = self.models.get(model) else {
            let known = self.models.names().join(", ");
            return Err(Rejection::UnknownModel { model: model.to_owned(), known }.into());
        };
        let redaction = self.redactor.redact(&normalized);
        let context = tokenizer.context_length();
        let budget = context.saturating_sub(self.policy.reserve_tokens);
        let too_many = |tokens| Rejection::TooManyTokens {
            model: model.to_owned(),
            tokens,
            budget,
            context,
            reserve: self.policy.reserve_tokens,
        };
        let (text, token_count, truncated) = match self.policy.overflow {
            Overflow::Reject => {
                let tokens = tokenizer.count(&redaction.text)?;
                if tokens > budget {
                    return Err(too_many(tokens).into());
                }
                (redaction.text, tokens, false)
            }
            Overflow::Truncate => match tokenizer.truncate(&redaction.text, budget)? {
                None => {
                    let tokens = tokenizer.count(&redaction.text)?;
                    (redaction.text, tokens, false)
                }
                Some((prefix, tokens)) => {
                    let kept = drop_partial_placeholder(&prefix);
                    let tokens = if kept.len() == prefix.len() { tokens } else { tokenizer.count(kept)? };
                    if kept.is_empty() {
                        // Not even one token fits (a reserve as large as the context).
                        return Err(too_many(tokenizer.count(&redaction.text)?).into());
                    }
                    (kept.to_owned(), tokens, true)
                }
            },
        };
        let redactions = redaction.counts.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
        Ok(Cleaned { text, token_count: token_count as u32, truncated, redactions })
    }
}

impl Preprocessor {
    /// An earlier message of the request's conversation (OpenAI's `messages`), made as safe as
    /// its text: normalized and redacted, placeholders counted into `redactions`. No length or
    /// token check: the session service fits the whole conversation to the model's budget.
    pub fn clean_turn(&self, content: &str, redactions: &mut BTreeMap<String, u32>) -> String {
        let redaction = self.redactor.redact(&normalize(content));
        for (kind, n) in redaction.counts {
            *redactions.entry(kind.to_owned()).or_default() += n;
        }
        redaction.text
    }
}

/// `text` without a placeholder cut short at its end (`… see [EMAI`), trimmed.
fn drop_partial_placeholder(text: &str) -> &str {
    if let Some(open) = text.rfind('[') {
        let tail = &text[open + 1..];
        let is_label_prefix = tail.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if is_label_prefix && !tail.contains(']') {
            return text[..open].trim_end();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_placeholders_at_the_end_are_dropped() {
        assert_eq!(drop_partial_placeholder("write to [EMAIL_1] or [EMA"), "write to [EMAIL_1] or");
        assert_eq!(drop_partial_placeholder("write to [EMAIL_1"), "write to");
        assert_eq!(drop_partial_placeholder("write to ["), "write to");
        assert_eq!(drop_partial_placeholder("write to [EMAIL_1]"), "write to [EMAIL_1]");
        assert_eq!(drop_partial_placeholder("a [note about"), "a [note about");
    }

    #[test]
    fn reasons() {
        assert_eq!(Rejection::EmptyText { original_chars: 3 }.reason(), "empty_text");
        assert_eq!(Rejection::TextTooLong { chars: 9, max: 8 }.reason(), "text_too_long");
        let unknown = Rejection::UnknownModel { model: "gpt-9".into(), known: "a, b".into() };
        assert_eq!(unknown.reason(), "unknown_model");
        assert!(unknown.to_string().contains("gpt-9"));
    }
}

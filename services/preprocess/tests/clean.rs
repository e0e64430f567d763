//! The per-text logic with the real prepared tokenizers (no NATS). Needs
//! `models/prepared/manifest.json` (`scripts/prepare-models.sh`).
use millrace_preprocess::budget::TokenModels;
use millrace_preprocess::clean::{Overflow, Policy, PreprocessError, Preprocessor, Rejection};
use millrace_preprocess::pii::Detectors;
use millrace_testkit::workspace_root;

const MODEL: &str = "smollm2-135m";

fn preprocessor(reserve_tokens: usize, overflow: Overflow) -> Preprocessor {
    let models = TokenModels::load(&workspace_root().join("models/prepared")).expect("prepared models");
    let policy = Policy { max_chars: 8000, reserve_tokens, overflow, detectors: Detectors::ALL };
    Preprocessor::new(policy, models)
}

fn rejection(result: Result<millrace_preprocess::clean::Cleaned, PreprocessError>) -> Rejection {
    match result {
        Err(PreprocessError::Rejected(r)) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_text_is_normalized_redacted_and_counted() {
    let p = preprocessor(512, Overflow::Reject);
    assert_eq!(p.models().names(), ["smollm2-135m", "tiny-llama"]);
    let c = p.process(MODEL, "  Ｈｅｌｌｏ,\u{200B} I'm ann@example.com — call +44 20 7946 0958!  ").unwrap();
    assert_eq!(c.text, "Hello, I'm [EMAIL_1] — call [PHONE_1]!");
    assert_eq!(c.redactions.get("email"), Some(&1));
    assert_eq!(c.redactions.get("phone"), Some(&1));
    assert!(!c.truncated);
    assert!((8..40).contains(&c.token_count), "{}", c.token_count);
}

#[test]
fn bad_input_gets_its_specific_rejection() {
    let p = preprocessor(512, Overflow::Reject);
    let r = rejection(p.process(MODEL, "\u{200B}\u{FEFF} \u{00AD}\t\n"));
    assert_eq!(r.reason(), "empty_text");
    let r = rejection(p.process(MODEL, &"a".repeat(8001)));
    assert_eq!(r, Rejection::TextTooLong { chars: 8001, max: 8000 });
    // Characters, not bytes: 8000 three-byte characters are not too long (though too many tokens).
    let r = rejection(p.process(MODEL, &"€".repeat(8000)));
    assert_eq!(r.reason(), "too_many_tokens");
    let r = rejection(p.process("gpt-9", "hello"));
    assert_eq!(r.reason(), "unknown_model");
    assert!(r.to_string().contains("smollm2-135m"));
    // The embedding model is in the manifest but is not a generation target.
    assert_eq!(rejection(p.process("minilm-l6", "hello")).reason(), "unknown_model");
    assert_eq!(rejection(p.process("", "hello")).reason(), "unknown_model");
}

#[test]
fn over_the_budget_is_rejected_or_truncated_by_policy() {
    // Budget: 8192 − 8092 = 100 tokens.
    let long = "The quick brown fox jumps over the lazy dog. Write to ann@example.com about it. ".repeat(20);
    let r = rejection(preprocessor(8092, Overflow::Reject).process(MODEL, &long));
    match &r {
        Rejection::TooManyTokens { tokens, budget: 100, .. } => assert!(*tokens > 100),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.reason(), "too_many_tokens");

    let p = preprocessor(8092, Overflow::Truncate);
    let c = p.process(MODEL, &long).unwrap();
    assert!(c.truncated);
    assert!(c.token_count <= 100 && c.token_count >= 90, "{}", c.token_count);
    assert!(long.trim().starts_with(&c.text.replace("[EMAIL_1]", "ann@example.com")));
    assert!(!c.text.ends_with(' '));
    assert_eq!(c.text.matches('[').count(), c.text.matches(']').count(), "{:?}", c.text);
    // Within budget: untouched.
    let c = p.process(MODEL, "short and sweet").unwrap();
    assert!(!c.truncated);
    assert_eq!(c.text, "short and sweet");
}

#[test]
fn truncation_never_splits_a_character_or_a_placeholder() {
    let models = TokenModels::load(&workspace_root().join("models/prepared")).unwrap();
    let tokenizer = models.get(MODEL).unwrap();
    let text = "🦀é漢字 ".repeat(200);
    for budget in [1, 2, 3, 7, 50, 333] {
        let (prefix, count) = tokenizer.truncate(&text, budget).unwrap().unwrap();
        assert!(count <= budget, "{count} > {budget}");
        assert!(text.starts_with(&prefix));
        assert_eq!(tokenizer.count(&prefix).unwrap(), count);
    }
    // A placeholder cut at the end goes whole.
    let p = preprocessor(8192 - 12, Overflow::Truncate);
    for filler in 1..12 {
        let text = format!("{} ann@example.com and more words after it", "word ".repeat(filler));
        let c = p.process(MODEL, &text).unwrap();
        let open = c.text.matches('[').count();
        assert_eq!(open, c.text.matches(']').count(), "{:?}", c.text);
    }
}

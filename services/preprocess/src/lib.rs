//! Millrace preprocess: QUERIES → CLEAN (docs/architecture.md, "Services").
//!
//! - Consumes `QUERIES` (durable `preprocess`). Each `Query` text is normalized (NFKC,
//!   invisible characters out, whitespace collapsed), validated (`empty_text`,
//!   `text_too_long`, `unknown_model`), PII-redacted into typed placeholders and counted with the
//!   target model's tokenizer against its budget (`too_many_tokens`, or truncated by policy).
//! - Publishes a `CleanedQuery` to `CLEAN`, or a terminal REJECTED `Result` to
//!   `RESULTS.<request_id>`, deduplicated on `<request_id>/preprocess`, PubAcked before the
//!   query is acked. The original text never leaves the stage.
//!
//! - [`config`]: flags; [`normalize`]: text normalization; [`pii`]: PII detection and
//!   redaction; [`budget`]: token counting and truncation; [`clean`]: the whole per-text logic
//!   (pure, no NATS); [`stage`]: the bus stage.
pub mod budget;
pub mod clean;
pub mod config;
pub mod normalize;
pub mod pii;
pub mod stage;

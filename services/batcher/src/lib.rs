//! Millrace batcher: per-model dynamic batching between session and inference
//! (docs/architecture.md, "Services").
//!
//! - Consumes `PROMPTS` (durable `batcher`, subjects `mr.v1.prompts.<model>`) into one queue per
//!   model; dispatches a `Batch` to `mr.v1.batches.<model>` on size, token budget, max wait, or
//!   at once when the model is idle; at most `max_in_flight` batches per model in flight
//!   (counted as what is left of the model's batches in `BATCHES`); higher priority first.
//! - Requests past their deadline or cancelled (`mr.v1.cancel.<request_id>`, remembered for
//!   a while) never reach a batch: their `EXPIRED` / `CANCELLED` result goes to `RESULTS`
//!   (`<request_id>/batcher`).
//! - A prompt's message is acked only after its batch's PubAck (or its terminal result's);
//!   a batch's id derives from its members, so a batch re-formed after a crash is deduplicated.
//! - No API besides the admin server's `/metrics` (batch size, batch tokens, queue wait,
//!   dispatch reasons, expired/cancelled, queue depth, in-flight batches).
//!
//! - [`config`]: flags; [`queue`]: the batching policy (pure, clock injected);
//!   [`stage`]: the handler, the queue task, publishing, in-flight counts, cancel notices;
//!   [`metrics`]: Prometheus metrics.
pub mod config;
pub mod metrics;
pub mod queue;
pub mod stage;

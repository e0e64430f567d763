//! Millrace batcher: the scheduler between session and inference (docs/architecture.md,
//! "Services").
//!
//! - Consumes `PROMPTS` (durable `batcher`, subjects `mr.v1.prompts.<model>`) into one queue per
//!   model and dispatches `Batch`es to `mr.v1.batches.<model>`.
//! - Credit-gated: inference replicas report their load (`ReplicaCapacity`, core NATS
//!   `mr.v1.capacity.<model>`); while a model has a live report, the batcher hands it at once
//!   as many requests as its replicas have free slots, and keeps the rest queued here. Without
//!   one (start-up, replicas that do not report) the fallback gate batches on size, token
//!   budget, max wait, or at once when the model is idle, with at most `max_in_flight` batches
//!   per model in flight (counted as what is left of the model's batches in `BATCHES`).
//! - Order: higher priority first; within a priority, token-weighted fair share between
//!   tenants (virtual token counters); within a tenant, earliest deadline, then arrival.
//! - Requests past their deadline or cancelled (`mr.v1.cancel.<request_id>`, remembered for
//!   a while) never reach a batch: their `EXPIRED` / `CANCELLED` result goes to `RESULTS`
//!   (`<request_id>/batcher`). A request arriving to a full queue (`--max-queue`), or whose
//!   expected wait outlasts its deadline, is refused at once: `RATE_LIMITED` `overloaded` with
//!   `retry_after_ms`.
//! - A prompt's message is acked only after its batch's PubAck (or its terminal result's);
//!   a batch's id derives from its members, so a batch re-formed after a crash is deduplicated.
//! - No API besides the admin server's `/metrics` (batch size, batch tokens, queue wait per
//!   priority and tenant, dispatch reasons, drops and refusals, queue depth per priority,
//!   in-flight batches, free slots, drain rate, each replica's reported load).
//!
//! - [`config`]: flags; [`queue`]: the scheduling policy (pure, clock injected);
//!   [`stage`]: the handler, the queue task, publishing, in-flight counts, capacity reports,
//!   cancel notices;
//!   [`metrics`]: Prometheus metrics.
pub mod config;
pub mod metrics;
pub mod queue;
pub mod stage;

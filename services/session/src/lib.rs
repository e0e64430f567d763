//! Millrace session: per-user conversation state between moderation and the batcher
//! (docs/architecture.md, "Services").
//!
//! - Consumes `ADMITTED` (durable `session`): checks the per-user rate limit (a token bucket per
//!   (tenant, user), in process memory — each replica enforces its own share), records the
//!   user's turn as **pending** in the conversation, renders the model's chat template over the
//!   system message, the conversation's last exchanges and the new text, trims the oldest
//!   exchanges until the prompt fits `context_length − reserve_tokens`, and publishes the
//!   `Prompt` to `mr.v1.prompts.<model>` (`<request_id>/session`). Over the limit: a terminal
//!   `RATE_LIMITED` result (`rate_limited`, with `retry_after_ms`) on `mr.v1.results.<id>`, and
//!   no prompt.
//! - Consumes `RESULTS` (durable `session-results`): a `COMPLETED` result turns the request's
//!   pending turn into an exchange (user text + completion); any other terminal status drops
//!   it. So only answered turns are remembered; blocked or failed ones never are.
//! - State: one JSON value per (tenant, user, session) in the JetStream KV bucket
//!   `MR_SESSIONS`: the last `max_turns` exchanges, in request order, plus pending turns. Every
//!   change is a compare-and-set on the key's revision, retried on conflict, so replicas never
//!   lose a turn; every write restarts the idle TTL (the bucket's max age).
//! - gRPC `millrace.v1.Sessions`: `Get` (turns, token and byte sizes, expiry, revision) and
//!   `Delete` ("forget me").
//!
//! - [`config`]: flags; [`key`]: KV key encoding; [`state`]: the stored conversation and its
//!   pure transitions; [`prompt`]: template rendering and trimming; [`limiter`]: the token
//!   buckets; [`store`]: the bucket and compare-and-set; [`stage`]: the two handlers;
//!   [`grpc`]: the API; [`metrics`]: Prometheus metrics.
pub mod config;
pub mod grpc;
pub mod key;
pub mod limiter;
pub mod metrics;
pub mod prompt;
pub mod stage;
pub mod state;
pub mod store;

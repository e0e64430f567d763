//! Millrace inference: the mesh's model server (docs/architecture.md, "Services"; the models
//! and the engine: docs/design.md, "Models and the engine").
//!
//! - Consumes `BATCHES` (durable `inference`): each member joins a generation loop's running
//!   set (iteration-level batching with prefix KV reuse, [`millrace_engine::scheduler`]); token pieces stream on core NATS `mr.v1.tokens.<request_id>` as `TokenChunk`s (a last
//!   one with `last: true`); then each request's `Completion` goes to `COMPLETIONS`, or, for a
//!   request cancelled, past its deadline or rejected, its terminal `Result` to `RESULTS` —
//!   all deduplicated on `<request_id>/inference` and PubAcked before the batch is acked.
//! - Follows `mr.v1.cancel.*`: a cancelled request stops inside its running batch.
//! - Serves gRPC `millrace.v1.Inference`: `Generate` (streamed; dropping the stream cancels it),
//!   `Embed`, `Classify`, with `INVALID_ARGUMENT` + a code for bad input and
//!   `RESOURCE_EXHAUSTED` `overloaded` while as many requests wait for admission as can run.
//! - Reports its load on core NATS `mr.v1.capacity.<model>` ([`capacity`]) for the batcher.
//!
//! - [`config`]: flags; [`pool`]: the loaded models; [`generation`]: the generation loops;
//!   [`request`]: parameters → engine request, admission rules (pure); [`cancel`]: the cancel
//!   registry (its notices come from the bus's cancel follower); [`stage`]: the bus stage; [`grpc`]: the API; [`error`]: the
//!   API's error codes.
pub mod cancel;
pub mod capacity;
pub mod config;
pub mod error;
pub mod generation;
pub mod grpc;
pub mod metrics;
pub mod pool;
pub mod request;
pub mod stage;

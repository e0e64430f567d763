//! Millrace moderation (docs/architecture.md, "Services"): a rule policy plus the profanity
//! classifier, before and after the model.
//!
//! - Input: consumes `CLEAN` (durable `moderation-input`); an allowed or flagged query goes on to
//!   `ADMITTED` with its verdicts, a blocked one ends as a `BLOCKED_INPUT` result on `RESULTS`
//!   — both deduplicated on `<request_id>/moderation-input`.
//! - Output: consumes `COMPLETIONS` (durable `moderation-output`); each completion ends as a
//!   `COMPLETED` result, or `BLOCKED_OUTPUT` with the policy's refusal text in place of the
//!   completion — deduplicated on `<request_id>/moderation-output`. Verdicts of both checks
//!   ride on the result. Messages are acked after their PubAck.
//! - The policy (a TOML file, or the shipped default) reloads without a restart on SIGHUP and
//!   when the file changes; a policy that does not parse or validate is refused and the one in
//!   force stays.
//! - Serves gRPC `millrace.v1.Moderation.Check`.
//!
//! - [`normalize`]: de-obfuscation before matching; [`policy`]: parsing, validation, rules;
//!   [`moderator`]: the policy store, the classifier pool, one check; [`reload`]: SIGHUP and
//!   file watching; [`stage`]: the two bus stages; [`grpc`]: the API; [`config`]: flags.
pub mod config;
pub mod grpc;
pub mod moderator;
pub mod normalize;
pub mod policy;
pub mod reload;
pub mod stage;

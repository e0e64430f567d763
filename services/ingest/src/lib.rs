//! Millrace ingest: the mesh's front door. Clients submit queries over HTTP or gRPC; each is
//! validated, given a request id and published to `QUERIES`, and the client is answered only
//! once the stream has acknowledged it (ARCHITECTURE.md §1–§3).
//!
//! | call | answer |
//! |---|---|
//! | `POST /v1/queries` | 202 `{"request_id", "status": "ACCEPTED"}` + `X-Request-Id`; 200 `"DUPLICATE"` for a retry with the same `Idempotency-Key` |
//! | `GET /v1/queries/{id}` | 200 with the sink's terminal row, or `{"request_id", "status": "PENDING"}` (also for an id never issued) |
//! | `DELETE /v1/queries/{id}` | 202 `"CANCELLING"`: a terminal CANCELLED result is published (the first terminal result stands) |
//! | `POST /v1/chat/completions`, `GET /v1/models` | OpenAI-compatible chat (plain or SSE stream), see [`openai`] |
//! | gRPC `Ingest.Submit` | `SubmitResponse{request_id, created}` |
//!
//! Every failure is `{"error": {"code", "message"}}` over HTTP, and over gRPC a status whose
//! message starts with the code, also in `x-millrace-code` metadata. Bad input is 400/413/415/422
//! (`InvalidArgument`) with one code per class ([`submit::SubmitError`]); a full stream is 429
//! `overloaded` with `Retry-After` (`ResourceExhausted`); NATS down is 503 `unavailable`.
//!
//! A 503 (or a lost answer) leaves it unknown whether the query was accepted; a client that must
//! not submit twice sends an `Idempotency-Key`, so its retry is recognised as the same request.
//!
//! - [`submit`]: the checks every submit passes and the `Query` it becomes (pure).
//! - [`json`]: the HTTP body, decoded so each bad input gets its own error code.
//! - [`gateway`]: publishing submits and cancellations, shared by both APIs.
//! - [`openai`]: the OpenAI-compatible chat API over the same submit path.
//! - [`http`], [`grpc`]: the two APIs; [`results`]: status reads from the sink.
//! - [`error`]: the one mapping of failures to codes, HTTP statuses and gRPC codes.
pub mod config;
pub mod error;
pub mod follow;
pub mod gateway;
pub mod grpc;
pub mod guard;
pub mod http;
pub mod json;
pub mod openai;
pub mod results;
pub mod submit;
pub mod ws;

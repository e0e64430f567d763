//! Millrace ingest: the mesh's front door. Clients submit queries over HTTP, WebSocket or gRPC;
//! each is validated, given a request id and published to `QUERIES`, and the client is answered
//! only once the stream has acknowledged it (docs/architecture.md, "The stage graph" and
//! "Services"). Clients that want the outcome are followed to it: moderated tokens as they are
//! released, then the terminal result.
//!
//! | call | answer |
//! |---|---|
//! | `POST /v1/queries` | 202 `{"request_id", "status": "ACCEPTED"}` + `X-Request-Id`; 200 `"DUPLICATE"` for a retry with the same `Idempotency-Key` |
//! | `GET /v1/queries/{id}` | 200 with the sink's terminal row, or `{"request_id", "status": "PENDING"}` (also for an id never issued) |
//! | `DELETE /v1/queries/{id}` | 202 `"CANCELLING"`: a terminal CANCELLED result is published (the first terminal result stands) |
//! | `POST /v1/chat/completions`, `GET /v1/models` | OpenAI-compatible chat (plain or SSE stream), see `http::openai` |
//! | `GET /v1/ws` (WebSocket) | several queries per socket: `accepted`, `token`, `result` and `error` frames, see `http::ws` |
//! | gRPC `Ingest.Submit` | `SubmitResponse{request_id, created}` |
//! | gRPC `Ingest.Generate` | a stream: `accepted`, moderated `token`s, then the terminal `result` |
//!
//! Every failure is `{"error": {"code", "message"}}` over HTTP (the OpenAI API uses OpenAI's
//! error shape, with the same codes), and over gRPC a status whose
//! message starts with the code, also in `x-millrace-code` metadata. Bad input is 400/413/415/422
//! (`InvalidArgument`) with one code per class ([`submit::SubmitError`]); a full stream is 429
//! `overloaded` with `Retry-After` (`ResourceExhausted`); NATS down is 503 `unavailable`.
//!
//! A 503 (or a lost answer) leaves it unknown whether the query was accepted; a client that must
//! not submit twice sends an `Idempotency-Key`, so its retry is recognised as the same request.
//!
//! - [`submit`]: the checks every submit passes and the `Query` it becomes (pure).
//! - [`json`]: the HTTP body, decoded so each bad input gets its own error code.
//! - [`gateway`]: publishing submits and cancellations, shared by every API.
//! - [`follow`]: following a request to its end; [`guard`]: releasing streamed text only once
//!   moderation allowed it.
//! - [`http`]: the HTTP APIs, one module each (`queries`, the OpenAI-compatible chat `openai`, the WebSocket
//!   `ws`); [`grpc`]: the gRPC API; [`results`]: status reads from the sink.
//! - [`error`]: the one mapping of failures to codes, HTTP statuses and gRPC codes;
//!   [`config`]: flags; [`metrics`]: end-to-end and time-to-first-token histograms.
pub mod auth;
pub mod config;
pub mod error;
pub mod follow;
pub mod gateway;
pub mod grpc;
pub mod guard;
pub mod http;
pub mod json;
pub mod metrics;
pub mod results;
pub mod submit;

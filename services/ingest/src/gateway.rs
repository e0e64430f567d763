//! What both APIs do once a call is decoded: validate, publish, and wait for the stream's PubAck
//! before answering, so "accepted" means durably on `QUERIES` (docs/architecture.md,
//! "Invariants": exactly one terminal row per accepted request).
use std::sync::Arc;

use millrace_bus::topology::ephemeral;
use millrace_bus::{Edge, Ledger, Outbound, Publisher, terminal_result};
use millrace_proto::now_unix_us;
use millrace_proto::v1::{Query, RequestContext, TerminalStatus, Timings};
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::SubmitPolicy;
use crate::error::ApiError;
use crate::submit::{STAGE, Submission, is_keyed};

/// Terminal reason of a request cancelled through the API.
const CANCELLED_BY_CLIENT: &str = "cancelled_by_client";

/// The outcome of an accepted submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub request_id: String,
    /// The model the request runs on (the policy's default when the client named none).
    pub model: String,
    /// False when the stream already held this request (an idempotent retry): nothing new was
    /// published.
    pub created: bool,
}

#[derive(Clone)]
pub struct Gateway {
    publisher: Publisher,
    policy: Arc<SubmitPolicy>,
}

impl Gateway {
    pub fn new(publisher: Publisher, policy: SubmitPolicy) -> Self {
        Self { publisher, policy: Arc::new(policy) }
    }

    /// Validates the submit and publishes its `Query`, deduplicated on `<request_id>/ingest`.
    pub async fn submit(&self, submission: Submission, received_unix_us: i64) -> Result<Accepted, ApiError> {
        let query = self.prepare(submission, received_unix_us)?;
        self.publish(query).await
    }

    /// Validates the submit and builds its `Query` without publishing it, so a caller can act
    /// on the request id first (the OpenAI stream subscribes to its tokens before publishing).
    pub fn prepare(&self, submission: Submission, received_unix_us: i64) -> Result<Query, ApiError> {
        Ok(submission.into_query(&self.policy, received_unix_us)?)
    }

    /// Publishes a `Query` built by [`Gateway::prepare`], deduplicated on `<request_id>/ingest`.
    ///
    /// A request with an idempotency key is accepted once for as long as the ledger remembers
    /// it, also across broker restarts (which forget the stream's dedup ids): a retry of an
    /// accepted one publishes nothing. Its record is written only after the PubAck, so a crash in
    /// between leaves a retry free to publish again (then the stream's dedup id, and past a
    /// broker restart the decided outcome, keep it one request).
    pub async fn publish(&self, query: Query) -> Result<Accepted, ApiError> {
        let ctx = query.ctx.as_ref().expect("into_query sets the context");
        let (request_id, model) = (ctx.request_id.clone(), ctx.model.clone());
        let keyed = is_keyed(&request_id);
        let ledger = self.publisher.ledger();
        if keyed && ledger.was_accepted(&request_id).await? {
            return Ok(Accepted { request_id, model, created: false });
        }
        let published = self
            .publisher
            .publish(Outbound::stage_output(Edge::QUERIES, STAGE, &query))
            .await
            .inspect_err(|e| warn!(request_id, error = %e, "submit not published"))?;
        if keyed {
            ledger.record_accepted(&request_id).await?;
        }
        Ok(Accepted { request_id, model, created: !published.duplicate })
    }

    /// The policy submits are checked against.
    pub fn policy(&self) -> &SubmitPolicy {
        &self.policy
    }

    /// The durable decisions (a request's outcome, for followers).
    pub fn ledger(&self) -> &Ledger {
        self.publisher.ledger()
    }

    /// The NATS connection (for core-NATS subscriptions such as a request's token stream).
    pub fn nats(&self) -> async_nats::Client {
        self.publisher.client()
    }

    /// Cancels a request: its terminal CANCELLED result first, then the core-NATS notice that
    /// tells stages to drop the request's work. In that order because a stage may drop a
    /// cancelled request silently: the notice must never go out without the terminal row that
    /// accounts for the request. The sink keeps the first terminal row, so cancelling a request
    /// that already finished changes nothing.
    ///
    /// `ctx` is the request's context where the caller knows it (a follower does), so the
    /// CANCELLED row names the request's user, tenant and model; otherwise only its id.
    pub async fn cancel(&self, ctx: &RequestContext) -> Result<(), ApiError> {
        let request_id = ctx.request_id.as_str();
        let mut timings = Timings::default();
        timings.record(STAGE, now_unix_us());
        let result = terminal_result(
            STAGE,
            Some(ctx.clone()),
            Some(timings),
            TerminalStatus::Cancelled,
            CANCELLED_BY_CLIENT,
            "cancelled by the client",
        );
        // Decided like any terminal result: a request that already ended keeps its outcome.
        self.publisher
            .publish(Outbound::terminal(&result))
            .await
            .inspect_err(|e| warn!(request_id, error = %e, "cancel not published"))?;
        // Core NATS: best effort by design; the terminal row above is what counts.
        if let Err(e) = self.publisher.client().publish(ephemeral::cancel(request_id), Default::default()).await {
            warn!(request_id, error = %e, "cancel notice not sent");
        }
        Ok(())
    }
}

/// Cancels its request when dropped before it is disarmed: a client that goes away (a closed socket, a
/// dropped stream or HTTP connection) before its request ended cancels it, so batcher and
/// inference stop spending work on an answer no one reads. [`CancelOnDrop::finished`] disarms it.
pub struct CancelOnDrop {
    gateway: Gateway,
    ctx: Option<RequestContext>,
}

impl CancelOnDrop {
    pub fn new(gateway: Gateway, ctx: RequestContext) -> Self {
        Self { gateway, ctx: Some(ctx) }
    }

    /// The request ended: nothing to cancel.
    pub fn finished(&mut self) {
        self.ctx = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            let gateway = self.gateway.clone();
            tokio::spawn(async move {
                info!(request_id = ctx.request_id, "client gone before the end: cancelling");
                // A failure is logged by `cancel`; the request then simply runs to its end.
                let _ = gateway.cancel(&ctx).await;
            });
        }
    }
}

/// A request id in its canonical form (lower-case hyphenated, as ingest issues them), so any
/// UUID spelling a client uses names the same request and is a safe subject token.
pub fn parse_request_id(id: &str) -> Result<String, ApiError> {
    Uuid::parse_str(id).map(|uuid| uuid.hyphenated().to_string()).map_err(|_| ApiError::InvalidRequestId(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_canonicalized() {
        let id = "0190A5B2-7C3D-7E4F-8A1B-2C3D4E5F6A7B";
        assert_eq!(parse_request_id(id).unwrap(), id.to_lowercase());
        assert_eq!(parse_request_id("0190a5b27c3d7e4f8a1b2c3d4e5f6a7b").unwrap(), id.to_lowercase());
        assert_eq!(parse_request_id("not-a-uuid").unwrap_err().code(), "invalid_request_id");
        assert_eq!(parse_request_id("a.b.>").unwrap_err().code(), "invalid_request_id");
    }
}

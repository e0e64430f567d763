//! The two consumers: ADMITTED → PROMPTS (with the per-user rate limit) and RESULTS → the
//! conversation.
//!
//! ```text
//! ADMITTED ─► rate limit ─► CAS: record pending turn ─► render + trim ─► PROMPTS  (ack after PubAck)
//!                 └─over─► RESULTS: RATE_LIMITED (no prompt, nothing stored)
//! RESULTS ──► CAS: COMPLETED → pending turn becomes an exchange; other status → pending dropped (ack after the write)
//! ```
//!
//! The pending turn is written before the prompt is published, so a result can never arrive
//! for a turn the conversation does not know yet; the prompt is built from the history of the
//! very revision that recorded it.
use std::sync::Arc;
use std::time::Duration;

use millrace_bus::{ConsumerSpec, Delivery, Edge, Handler, Outbound, Publisher, StageError, terminal_result};
use millrace_proto::v1::{AdmittedQuery, Prompt, Result as TerminalResult, TerminalStatus};
use millrace_proto::{Message as _, now_unix_ms};
use tracing::{debug, error, warn};

use crate::key::SessionId;
use crate::limiter::{Decision, RateLimiter};
use crate::metrics;
use crate::prompt::{Built, Conversation, PromptError, PromptModels, PromptPolicy};
use crate::state::{Begin, Completion};
use crate::store::{KvBackend, SessionStore, StoreError};

/// This stage's name in timings, terminal results and dedup ids.
pub const STAGE: &str = ConsumerSpec::SESSION.durable;

/// What both consumers and the gRPC API share.
pub struct SessionCore<B> {
    pub store: SessionStore<B>,
    pub models: PromptModels,
    pub limiter: RateLimiter,
    pub policy: PromptPolicy,
    /// Exchanges kept per conversation.
    pub max_turns: usize,
    /// The bucket's max age (for `expires_unix_ms`).
    pub idle_ttl: Duration,
}

impl<B> SessionCore<B> {
    /// The prompt of a query: its raw text when it asks for no template, else the model's
    /// template over its conversation.
    pub fn build_prompt(&self, model: &str, conversation: &Conversation, raw: bool) -> Result<Built, PromptError> {
        let m = self.models.get(model).ok_or_else(|| PromptError::Models(format!("unknown model {model:?}")))?;
        if raw { m.raw(&conversation.user_text) } else { m.build(&self.policy, conversation) }
    }
}

fn store_error(e: StoreError) -> StageError {
    let delay = match e {
        // Lost every race: come back soon, the rivals will be done.
        StoreError::Contended(_) => Duration::from_millis(100),
        StoreError::Kv(_) => Duration::from_millis(500),
    };
    StageError::transient(e.to_string(), delay)
}

/// The ADMITTED handler.
pub struct AdmittedStage<B> {
    pub core: Arc<SessionCore<B>>,
    pub publisher: Publisher,
}

impl<B: KvBackend> Handler for AdmittedStage<B> {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let query: AdmittedQuery = delivery.decode()?;
        let ctx = millrace_bus::require_request(query.ctx.as_ref())?.clone();
        if ctx.user.is_empty() {
            let detail = "an admitted query names no user: its conversation cannot be kept";
            return Err(StageError::poison(TerminalStatus::Failed, "missing_user", detail, Some(ctx)));
        }
        if self.core.models.get(&ctx.model).is_none() {
            let detail = format!(
                "no chat template or tokenizer for model {:?} (have {:?})",
                ctx.model,
                self.core.models.names()
            );
            return Err(StageError::poison(TerminalStatus::Rejected, "unknown_model", detail, Some(ctx)));
        }
        let id = SessionId::resolve(&ctx.tenant, &ctx.user, &ctx.session);
        let request_id = ctx.request_id.as_str();

        // A redelivered query whose pending turn is recorded passed the limit before. A query
        // whose request has ended (rate limited and then lost its ack, cancelled, or a copy
        // published again after a broker restart) is done: it neither counts against the
        // limit nor touches the conversation. A stateless query has no conversation to look into.
        let mut passed_before = false;
        if delivery.deliveries > 1 && ctx.keeps_history() {
            let loaded = self.core.store.load(&id).await.map_err(store_error)?;
            passed_before = loaded.conversation.is_some_and(|c| c.knows(request_id));
        }
        if !passed_before && self.publisher.republish_outcome(request_id).await? {
            debug!(request_id, "the query's request has already ended: its outcome is published again");
            return Ok(());
        }
        if !passed_before && let Decision::Limited { retry_after } = self.core.limiter.check(&ctx.tenant, &ctx.user) {
            metrics::RATE_LIMITED.inc();
            self.publisher.publish(rate_limited(query, retry_after, delivery.received_unix_us)).await?;
            return Ok(());
        }

        // A stateless query's prompt is its own messages; otherwise its pending turn is
        // recorded first and the conversation's history comes before its messages.
        let history = if !ctx.keeps_history() {
            Vec::new()
        } else {
            let now = now_unix_ms();
            let modified = self
                .core
                .store
                .modify(&id, |c| {
                    let begin = c.begin(request_id, &query.text, &ctx.model, now);
                    (begin == Begin::Added, begin)
                })
                .await
                .map_err(store_error)?;
            if modified.outcome == Begin::AlreadyCompleted {
                debug!(request_id, "redelivered query already completed");
                return Ok(());
            }
            modified.conversation.history(request_id)
        };
        let conversation = Conversation::of(
            &history,
            query.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())),
            &query.text,
        );
        let (core, model, raw) = (self.core.clone(), ctx.model.clone(), ctx.raw_prompt);
        // Rendering and tokenizing a long conversation is CPU work: off the async workers.
        let built = tokio::task::spawn_blocking(move || core.build_prompt(&model, &conversation, raw))
            .await
            .map_err(|e| StageError::transient(format!("prompt task: {e}"), Duration::from_millis(100)))?;
        let built = match built {
            Ok(b) => b,
            Err(e @ PromptError::TooLong { .. }) => {
                return Err(StageError::poison(TerminalStatus::Rejected, "too_many_tokens", e.to_string(), Some(ctx)));
            }
            Err(e) => return Err(StageError::poison(TerminalStatus::Failed, "prompt_error", e.to_string(), Some(ctx))),
        };
        metrics::TURNS_TRIMMED.inc_by(built.turns_dropped as u64);
        let out = prompt_message(query, built, delivery.received_unix_us);
        self.publisher.publish(out).await?;
        metrics::PROMPTS.with_label_values(&[&ctx.model]).inc();
        Ok(())
    }
}

/// The prompt published to `mr.v1.prompts.<model>` (`<request_id>/session`).
pub fn prompt_message(query: AdmittedQuery, built: Built, received_unix_us: i64) -> Outbound {
    let mut timings = query.timings.unwrap_or_default();
    timings.record(STAGE, received_unix_us);
    let prompt = Prompt {
        ctx: query.ctx,
        timings: Some(timings),
        prompt: built.prompt,
        prompt_tokens: built.prompt_tokens as u32,
        turns_used: built.turns_used as u32,
        turns_dropped: built.turns_dropped as u32,
        user_text: query.text,
        verdicts: query.verdicts,
    };
    Outbound::stage_output(Edge::PROMPTS, STAGE, &prompt)
}

/// The terminal RATE_LIMITED result of a query over its user's limit (`<request_id>/session`).
pub fn rate_limited(query: AdmittedQuery, retry_after: Duration, received_unix_us: i64) -> Outbound {
    let mut timings = query.timings.unwrap_or_default();
    timings.record(STAGE, received_unix_us);
    let retry_after_ms = retry_after.as_millis().max(1).min(u128::from(u32::MAX)) as u32;
    // Round up: retrying after the hint must find a token.
    let retry_after_ms = if Duration::from_millis(u64::from(retry_after_ms)) < retry_after {
        retry_after_ms + 1
    } else {
        retry_after_ms
    };
    let user = query.ctx.as_ref().map_or("", |c| c.user.as_str());
    let detail = format!("user {user:?} is over the per-user rate limit; retry in {retry_after_ms} ms");
    Outbound::terminal(&TerminalResult {
        verdicts: query.verdicts,
        retry_after_ms,
        ..terminal_result(STAGE, query.ctx, Some(timings), TerminalStatus::RateLimited, "rate_limited", detail)
    })
}

/// The RESULTS handler: completes or drops the request's pending turn. It reads RESULTS beside
/// the sink and never answers a request itself: a result it cannot use is acked and ignored.
pub struct ResultsStage<B> {
    pub core: Arc<SessionCore<B>>,
    /// The consumer's max deliveries: on the last one a failing write gives up (the turn is
    /// not remembered) rather than have the bus dead-letter the result, which would publish a
    /// second terminal result for the request.
    pub max_deliver: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    Completed(Completion),
    Abandoned(bool),
}

impl<B: KvBackend> Handler for ResultsStage<B> {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let Ok(result) = TerminalResult::decode(delivery.payload.as_ref()) else {
            warn!(subject = delivery.subject, "undecodable result: ignored");
            return Ok(());
        };
        // A stateless request has no conversation to complete.
        let Some(ctx) =
            result.ctx.as_ref().filter(|c| !c.request_id.is_empty() && !c.user.is_empty() && c.keeps_history())
        else {
            return Ok(());
        };
        let id = SessionId::resolve(&ctx.tenant, &ctx.user, &ctx.session);
        let request_id = ctx.request_id.as_str();
        let completed = result.status == i32::from(TerminalStatus::Completed);
        let (max_turns, now) = (self.core.max_turns, now_unix_ms());
        let modified = self
            .core
            .store
            .modify(&id, |c| {
                if completed {
                    let outcome = c.complete(request_id, &result.completion, max_turns, now);
                    (matches!(outcome, Completion::Stored { .. }), Resolution::Completed(outcome))
                } else {
                    let dropped = c.abandon(request_id);
                    (dropped, Resolution::Abandoned(dropped))
                }
            })
            .await;
        match modified {
            Ok(m) => {
                match m.outcome {
                    Resolution::Completed(Completion::Stored { dropped }) => {
                        metrics::TURNS_STORED.inc();
                        debug!(request_id, dropped, revision = m.revision, "exchange stored");
                    }
                    Resolution::Completed(outcome) => debug!(request_id, ?outcome, "nothing to store"),
                    Resolution::Abandoned(true) => metrics::TURNS_ABANDONED.inc(),
                    Resolution::Abandoned(false) => {}
                }
                Ok(())
            }
            Err(e) if delivery.deliveries >= self.max_deliver => {
                error!(request_id, error = %e, "giving up on the result: its turn is not remembered");
                Ok(())
            }
            Err(e) => Err(store_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use millrace_proto::v1::{RequestContext, Timings, Verdict};

    use super::*;

    fn query() -> AdmittedQuery {
        AdmittedQuery {
            ctx: Some(RequestContext {
                request_id: "r1".into(),
                tenant: "t".into(),
                user: "alice".into(),
                session: "s".into(),
                model: "smollm2-135m".into(),
                ..Default::default()
            }),
            timings: Some(Timings::default()),
            text: "hi".into(),
            token_count: 1,
            verdicts: vec![Verdict { stage: "input".into(), action: "allow".into(), ..Default::default() }],
            messages: vec![],
        }
    }

    #[test]
    fn the_prompt_carries_context_verdicts_user_text_and_a_session_timing() {
        let built = Built { prompt: "P".into(), prompt_tokens: 7, turns_used: 2, turns_dropped: 1 };
        let out = prompt_message(query(), built, 5);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.prompts.smollm2-135m", "r1/session"));
        let p = Prompt::decode(out.payload).unwrap();
        assert_eq!((p.prompt.as_str(), p.prompt_tokens, p.turns_used, p.user_text.as_str()), ("P", 7, 2, "hi"));
        assert_eq!(p.ctx.unwrap().user, "alice");
        assert_eq!(p.verdicts.len(), 1);
        let t = &p.timings.unwrap().stages[0];
        assert_eq!((t.stage.as_str(), t.received_unix_us), ("session", 5));
    }

    #[test]
    fn a_rate_limited_query_gets_a_terminal_result_with_a_rounded_up_hint() {
        let out = rate_limited(query(), Duration::from_micros(150_500), 5);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.results.r1", "r1/outcome"));
        let r = TerminalResult::decode(out.payload).unwrap();
        assert_eq!(r.status, i32::from(TerminalStatus::RateLimited));
        assert_eq!((r.reason.as_str(), r.retry_after_ms, r.stage.as_str()), ("rate_limited", 151, "session"));
        assert!(r.prompt.is_empty() && r.completion.is_empty());
        assert_eq!(r.ctx.unwrap().request_id, "r1");
        let r = TerminalResult::decode(rate_limited(query(), Duration::from_millis(200), 5).payload).unwrap();
        assert_eq!(r.retry_after_ms, 200);
        let r = TerminalResult::decode(rate_limited(query(), Duration::ZERO, 5).payload).unwrap();
        assert_eq!(r.retry_after_ms, 1);
    }
}

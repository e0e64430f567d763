//! The stage QUERIES → CLEAN: each `Query` becomes a `CleanedQuery` on CLEAN, or — for input
//! the mesh refuses (empty, too long, unknown model, too many tokens) — a terminal REJECTED
//! `Result` on `RESULTS.<request_id>`. Either way one message, deduplicated on
//! `<request_id>/preprocess`, PubAcked before the query is acked. An expected rejection is an
//! ordinary outcome, not a poison message: it writes no DLQ record. Undecodable payloads, a
//! query without a request id and a tokenizer failure are poison (DLQ + FAILED result).
//!
//! The original text never leaves this stage: the `CleanedQuery` carries only the normalized,
//! redacted text, and a REJECTED result carries no text at all.
use std::sync::Arc;

use millrace_bus::{ConsumerSpec, Delivery, Edge, Handler, Outbound, Publisher, StageError, terminal_result};
use millrace_proto::v1::{CleanedQuery, Query, RequestContext, TerminalStatus};
use tracing::debug;

use crate::clean::{Cleaned, PreprocessError, Preprocessor, Rejection};

/// This stage's name in timings, terminal results and dedup ids.
pub const STAGE: &str = ConsumerSpec::PREPROCESS.durable;

/// Texts up to this many bytes are processed on the async worker (tens of microseconds);
/// longer ones on the blocking pool, so a burst of long texts does not stall the runtime.
const INLINE_BYTES: usize = 2048;

pub struct PreprocessStage {
    pub preprocessor: Arc<Preprocessor>,
    pub publisher: Publisher,
}

impl Handler for PreprocessStage {
    async fn handle(&self, delivery: &Delivery) -> Result<(), StageError> {
        let mut query: Query = delivery.decode()?;
        let ctx = query.ctx.get_or_insert_with(RequestContext::default);
        if ctx.request_id.is_empty() {
            ctx.request_id = delivery.request_id().ok_or_else(|| {
                StageError::poison(TerminalStatus::Failed, "missing_request_id", "query has no request id", None)
            })?;
        }
        let text = std::mem::take(&mut query.text);
        let model = ctx.model.clone();
        let outcome = if text.len() <= INLINE_BYTES {
            self.preprocessor.process(&model, &text)
        } else {
            let preprocessor = self.preprocessor.clone();
            tokio::task::spawn_blocking(move || preprocessor.process(&model, &text))
                .await
                .map_err(|e| StageError::transient(format!("preprocess job: {e}"), std::time::Duration::from_secs(1)))?
        };
        let outcome = match outcome {
            Ok(cleaned) => Ok(cleaned),
            Err(PreprocessError::Rejected(rejection)) => Err(rejection),
            Err(PreprocessError::Tokenizer(e)) => {
                return Err(StageError::poison(TerminalStatus::Failed, "tokenizer_error", e.to_string(), query.ctx));
            }
        };
        let outcome = outcome.map(|mut cleaned| {
            for turn in &mut query.messages {
                turn.content = self.preprocessor.clean_turn(&turn.content, &mut cleaned.redactions);
            }
            cleaned
        });
        if let Err(rejection) = &outcome {
            debug!(reason = rejection.reason(), %rejection, "rejected");
        }
        self.publisher.publish(outbound(query, outcome, delivery.received_unix_us)).await?;
        Ok(())
    }
}

/// The one message a query becomes. `query.ctx` holds the request id; its text is not used.
pub fn outbound(query: Query, outcome: Result<Cleaned, Rejection>, received_unix_us: i64) -> Outbound {
    let ctx = query.ctx.unwrap_or_default();
    let mut timings = query.timings.unwrap_or_default();
    timings.record(STAGE, received_unix_us);
    match outcome {
        Ok(cleaned) => {
            let cleaned = CleanedQuery {
                ctx: Some(ctx),
                timings: Some(timings),
                text: cleaned.text,
                token_count: cleaned.token_count,
                truncated: cleaned.truncated,
                redactions: cleaned.redactions.into_iter().collect(),
                messages: query.messages,
            };
            Outbound::stage_output(Edge::CLEAN, STAGE, &cleaned)
        }
        Err(rejection) => Outbound::terminal(&terminal_result(
            STAGE,
            Some(ctx),
            Some(timings),
            TerminalStatus::Rejected,
            rejection.reason(),
            rejection.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use millrace_proto::Message as _;
    use millrace_proto::v1::Result as TerminalResult;
    use std::collections::BTreeMap;

    use millrace_proto::v1::Timings;

    use super::*;

    fn query(id: &str) -> Query {
        Query {
            ctx: Some(RequestContext { request_id: id.into(), model: "m".into(), ..Default::default() }),
            timings: Some(Timings::default()),
            text: "original with ann@example.com".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_cleaned_query_goes_to_clean_with_its_timing() {
        let cleaned = Cleaned {
            text: "with [EMAIL_1]".into(),
            token_count: 5,
            truncated: false,
            redactions: BTreeMap::from([("email".to_owned(), 1)]),
        };
        let out = outbound(query("r1"), Ok(cleaned), 42);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.clean", "r1/preprocess"));
        let q = CleanedQuery::decode(out.payload).unwrap();
        assert_eq!(q.text, "with [EMAIL_1]");
        assert_eq!((q.token_count, q.truncated, q.redactions["email"]), (5, false, 1));
        let timing = &q.timings.unwrap().stages[0];
        assert_eq!((timing.stage.as_str(), timing.received_unix_us), ("preprocess", 42));
        assert!(timing.finished_unix_us >= 42);
    }

    #[test]
    fn a_rejection_is_a_terminal_result_without_the_text() {
        let out = outbound(query("r2"), Err(Rejection::TextTooLong { chars: 9001, max: 8000 }), 1);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.results.r2", "r2/outcome"));
        let r = TerminalResult::decode(out.payload).unwrap();
        assert_eq!(r.status(), TerminalStatus::Rejected);
        assert_eq!((r.reason.as_str(), r.stage.as_str()), ("text_too_long", "preprocess"));
        assert!(r.detail.contains("9001"));
        assert!(r.prompt.is_empty());
        assert_eq!(r.ctx.unwrap().request_id, "r2");
    }
}

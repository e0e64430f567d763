//! The one way a stage builds what it publishes for a request: its message for the next edge,
//! or the terminal result that ends the request. Each carries the request's context and timing
//! record, goes to the subject its edge derives from that context, and has the dedup id
//! `<request_id>/<suffix>` that [`Dedup`] names, so the invariant "exactly one terminal row per
//! accepted request" rests on these two constructors rather than on every stage's copy.
use millrace_proto::v1::{Batch, RequestContext, Result as TerminalResult, TerminalStatus, Timings};
use millrace_proto::{Message as _, PerRequest};

use crate::publisher::Outbound;
use crate::topology::{ConsumerSpec, Edge, EdgeKey};

/// The dedup-id suffix of a request's message: `Nats-Msg-Id = <request_id>/<suffix>`. One kind
/// of publish, one suffix, so a retried publish is recognised and two different messages of a
/// request never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup<'a> {
    /// A stage's output for the next edge: the stage's name.
    Stage(&'a str),
    /// The request's terminal result, whoever publishes it: the ledger lets only the decided
    /// outcome out ([`crate::ledger`]), so every copy is the same message.
    Outcome,
    /// The DLQ record of a message `stage` dead-lettered.
    DeadLetter(&'a str),
}

impl<'a> Dedup<'a> {
    /// The suffix of a terminal result.
    pub const OUTCOME: &'static str = "outcome";
    /// Prefix of a DLQ record's suffix, before the stage: `dlq.<stage>`.
    pub const DEAD_LETTER_PREFIX: &'static str = "dlq.";

    /// The stage that publishes it (empty for a terminal result, which any stage may publish).
    pub fn stage(self) -> &'a str {
        match self {
            Self::Stage(stage) | Self::DeadLetter(stage) => stage,
            Self::Outcome => "",
        }
    }

    /// The `Nats-Msg-Id` for `request_id`.
    pub fn msg_id(self, request_id: &str) -> String {
        match self {
            Self::Stage(stage) => format!("{request_id}/{stage}"),
            Self::Outcome => format!("{request_id}/{}", Self::OUTCOME),
            Self::DeadLetter(stage) => format!("{request_id}/{}{stage}", Self::DEAD_LETTER_PREFIX),
        }
    }
}

impl Outbound {
    /// A request's message on `edge`: the subject keyed as the edge is (by request id or by the
    /// context's model), the dedup id `<request_id>/<suffix>`.
    pub fn per_request(edge: Edge, dedup: Dedup<'_>, message: &impl PerRequest) -> Self {
        let ctx = message.ctx();
        let key = match edge.key {
            EdgeKey::None => "",
            EdgeKey::Request => message.request_id(),
            EdgeKey::Model => ctx.map_or("", |c| c.model.as_str()),
            EdgeKey::Stage => dedup.stage(),
        };
        Self {
            subject: edge.subject_for(key),
            msg_id: dedup.msg_id(message.request_id()),
            payload: message.encode_to_vec().into(),
        }
    }

    /// A stage's message for the next edge, deduplicated on `<request_id>/<stage>`.
    pub fn stage_output(edge: Edge, stage: &str, message: &impl PerRequest) -> Self {
        Self::per_request(edge, Dedup::Stage(stage), message)
    }

    /// A batch on its model's BATCHES subject. It is many requests' message, so its dedup id is
    /// `<batch_id>/batcher`, the batch id being derived from the model and the members: the
    /// same members batched again (a redelivery after a crash) are dropped by the stream.
    pub fn batch(batch: &Batch) -> Self {
        Self {
            subject: Edge::BATCHES.subject_for(&batch.model),
            msg_id: Dedup::Stage(ConsumerSpec::BATCHER.durable).msg_id(&batch.batch_id),
            payload: batch.encode_to_vec().into(),
        }
    }

    /// A terminal result on RESULTS, deduplicated on `<request_id>/outcome` whichever stage
    /// ended the request (the publisher sends the decided outcome in its place if another was
    /// decided first).
    pub fn terminal(result: &TerminalResult) -> Self {
        Self::per_request(Edge::RESULTS, Dedup::Outcome, result)
    }
}

/// The terminal result with which `stage` ends a request: its context, its timing record (the
/// ending stage's share already recorded), status, machine-readable reason and detail. What a
/// stage knows beyond that (prompt, completion, verdicts, token counts, model version) it sets
/// with struct-update syntax: `TerminalResult { completion, ..terminal_result(…) }`.
pub fn terminal_result(
    stage: &str,
    ctx: Option<RequestContext>,
    timings: Option<Timings>,
    status: TerminalStatus,
    reason: impl Into<String>,
    detail: impl Into<String>,
) -> TerminalResult {
    TerminalResult {
        ctx,
        timings,
        status: status.into(),
        reason: reason.into(),
        detail: detail.into(),
        stage: stage.to_owned(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use millrace_proto::v1::{Prompt, Query};

    use super::*;

    fn ctx() -> Option<RequestContext> {
        Some(RequestContext { request_id: "r1".into(), model: "smollm2".into(), ..Default::default() })
    }

    #[test]
    fn dedup_suffixes_are_distinct_per_kind_of_publish() {
        let ids = [
            Dedup::Stage("batcher").msg_id("r1"),
            Dedup::Outcome.msg_id("r1"),
            Dedup::DeadLetter("batcher").msg_id("r1"),
        ];
        assert_eq!(ids, ["r1/batcher", "r1/outcome", "r1/dlq.batcher"]);
        assert!(ids.iter().all(|id| crate::request_id_from_msg_id(id) == Some("r1")));
    }

    #[test]
    fn subjects_follow_the_edge_key() {
        let query = Query { ctx: ctx(), ..Default::default() };
        assert_eq!(Outbound::stage_output(Edge::QUERIES, "ingest", &query).subject, "mr.v1.queries");
        let prompt = Prompt { ctx: ctx(), ..Default::default() };
        let out = Outbound::stage_output(Edge::PROMPTS, "session", &prompt);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.prompts.smollm2", "r1/session"));
    }

    #[test]
    fn a_terminal_result_goes_to_its_request_subject_under_its_stage() {
        let result = terminal_result("preprocess", ctx(), None, TerminalStatus::Rejected, "empty_text", "no text");
        let out = Outbound::terminal(&result);
        assert_eq!((out.subject.as_str(), out.msg_id.as_str()), ("mr.v1.results.r1", "r1/outcome"));
        let decoded = TerminalResult::decode(out.payload).unwrap();
        assert_eq!((decoded.status(), decoded.reason.as_str()), (TerminalStatus::Rejected, "empty_text"));
    }
}
